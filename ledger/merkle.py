"""RFC 9162 Merkle tree: hashing, frontier, proofs and their verification.

Pure functions over hashes: no I/O, no clock. The leaf hash of an entry is
SHA-256(0x00 ‖ entry); an interior node is SHA-256(0x01 ‖ left ‖ right); the
root of the empty tree is SHA-256("") (RFC 9162 §2.1.1).

Storage model. Subtree ``(level, index)`` is the complete subtree of
``2**level`` leaves starting at leaf ``index * 2**level``; level 0 holds the
leaf hashes. Once written, a complete subtree never changes. Proofs and the
root of any earlier tree size need only O(log n) of those hashes, read through
a :data:`HashAt` callable, so the store keeps a table of complete subtrees and
writes the rows :meth:`Frontier.extend_with_subtrees` returns on each append.

The :class:`Frontier` (a compact range from leaf 0) is the list of the
perfect subtrees on the tree's right edge, largest first: one per set bit of
the tree size. It is all an appender needs to keep, and all the head stores.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from ledger.errors import ProofError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
_FRONTIER_VERSION = 1
_MAX_SIZE = 2**64 - 1

HashAt = Callable[[int, int], bytes]
"""``hash_at(level, index)``: hash of the complete subtree ``(level, index)``."""


@dataclass(slots=True)
class Subtree:
    """A complete subtree: ``2**level`` leaves from leaf ``index * 2**level``."""

    # Not frozen: a frozen dataclass costs ~3x to build, and appends build two
    # of these per leaf. Treat it as a value all the same.

    level: int
    index: int
    hash: bytes


def leaf_hash(entry: bytes) -> bytes:
    """RFC 9162 leaf hash: SHA-256(0x00 ‖ entry)."""
    return hashlib.sha256(_LEAF_PREFIX + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: SHA-256(0x01 ‖ left ‖ right)."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


# --- frontier ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frontier:
    """The right edge of a tree of ``size`` leaves: perfect-subtree roots, largest first."""

    size: int = 0
    hashes: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.size <= _MAX_SIZE:
            raise ProofError(f"tree size {self.size} is outside 0..2**64-1")
        if len(self.hashes) != self.size.bit_count():
            raise ProofError(
                f"a frontier of size {self.size} has {self.size.bit_count()} hashes, "
                f"not {len(self.hashes)}"
            )
        for value in self.hashes:
            _require_hash(value, "frontier hash")

    def root(self) -> bytes:
        """Root hash of the tree of ``size`` leaves (EMPTY_ROOT when empty)."""
        return _fold(self.hashes) if self.hashes else EMPTY_ROOT

    def append(self, leaf: bytes) -> Frontier:
        """The frontier after appending one leaf hash."""
        return self.extend((leaf,))

    def extend(self, leaves: Iterable[bytes]) -> Frontier:
        """The frontier after appending ``leaves`` (leaf hashes) in order."""
        stack = list(self.hashes)
        size = _push_all(stack, self.size, leaves, None)
        return Frontier(size, tuple(stack))

    def extend_with_subtrees(self, leaves: Iterable[bytes]) -> tuple[Frontier, list[Subtree]]:
        """The frontier after appending ``leaves``, and every subtree they completed.

        The subtrees include the new leaves themselves (level 0) and are listed
        in the order they closed; together with the rows written by earlier
        appends they are exactly the complete subtrees of the new tree.
        """
        stack = list(self.hashes)
        completed: list[Subtree] = []
        size = _push_all(stack, self.size, leaves, completed)
        return Frontier(size, tuple(stack)), completed

    def subtrees(self) -> list[Subtree]:
        """The frontier's hashes as subtrees (what retention must keep at a cut)."""
        return [
            Subtree(level, index, value)
            for (level, index), value in zip(_perfect_cover(0, self.size), self.hashes, strict=True)
        ]

    def to_bytes(self) -> bytes:
        """Serialised form: version byte, 8-byte big-endian size, then the hashes."""
        return bytes((_FRONTIER_VERSION,)) + self.size.to_bytes(8, "big") + b"".join(self.hashes)

    @classmethod
    def from_bytes(cls, data: bytes) -> Frontier:
        """Parse :meth:`to_bytes` output; raise ProofError on anything else."""
        if len(data) < 9 or data[0] != _FRONTIER_VERSION:
            raise ProofError("frontier bytes do not start with version 1 and a size")
        size = int.from_bytes(data[1:9], "big")
        body = data[9:]
        if len(body) != HASH_SIZE * size.bit_count():
            raise ProofError(f"frontier of size {size} has {len(body)} bytes of hashes")
        hashes = tuple(body[i : i + HASH_SIZE] for i in range(0, len(body), HASH_SIZE))
        return cls(size, hashes)


def _push_all(
    stack: list[bytes], size: int, leaves: Iterable[bytes], completed: list[Subtree] | None
) -> int:
    """Append ``leaves`` to the right-edge ``stack`` in place; return the new size."""
    sha256 = hashlib.sha256
    for leaf in leaves:
        _require_hash(leaf, "leaf hash")
        if completed is not None:
            completed.append(Subtree(0, size, leaf))
        node, level = leaf, 0
        # Each set low bit of ``size`` is a perfect subtree on the edge waiting for
        # a right sibling of its height: the new leaf closes them, lowest first.
        while (size >> level) & 1:
            node = sha256(_NODE_PREFIX + stack.pop() + node).digest()
            level += 1
            if completed is not None:
                completed.append(Subtree(level, size >> level, node))
        stack.append(node)
        size += 1
    if size > _MAX_SIZE:
        raise ProofError("tree size would exceed 2**64-1")
    return size


def _fold(hashes: Sequence[bytes]) -> bytes:
    """Root over perfect subtrees listed largest first: smaller ones hang to the right."""
    root = hashes[-1]
    for value in reversed(hashes[:-1]):
        root = node_hash(value, root)
    return root


def _perfect_cover(start: int, end: int) -> Iterator[tuple[int, int]]:
    """(level, index) of the perfect subtrees covering [start, end), left to right.

    ``start`` must be a multiple of the largest of them, which holds for every
    range RFC 9162's recursion visits and for every prefix.
    """
    width = end - start
    for level in range(width.bit_length() - 1, -1, -1):
        if (width >> level) & 1:
            yield level, start >> level
            start += 1 << level


# --- roots from stored subtrees ----------------------------------------------


def root_at(size: int, hash_at: HashAt) -> bytes:
    """Root hash of the tree's first ``size`` leaves, from O(log size) stored subtrees."""
    _require_size(size)
    return _range_root(0, size, hash_at) if size else EMPTY_ROOT


def frontier_at(size: int, hash_at: HashAt) -> Frontier:
    """The frontier of the tree's first ``size`` leaves, from stored subtrees."""
    _require_size(size)
    return Frontier(size, tuple(hash_at(level, i) for level, i in _perfect_cover(0, size)))


def _range_root(start: int, end: int, hash_at: HashAt) -> bytes:
    """MTH(D[start:end]); an incomplete range is rebuilt from its complete subtrees."""
    return _fold([hash_at(level, index) for level, index in _perfect_cover(start, end)])


def _split(width: int) -> int:
    """RFC 9162's k: the largest power of two smaller than ``width`` (``width`` > 1)."""
    return 1 << ((width - 1).bit_length() - 1)


# --- proof generation ----------------------------------------------------------


def inclusion_proof(index: int, size: int, hash_at: HashAt) -> list[bytes]:
    """RFC 9162 §2.1.3.1 PATH(index, D[0:size]), bottom-up, from stored subtrees."""
    _require_size(size)
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not in a tree of size {size}")
    path: list[bytes] = []
    start, end = 0, size
    # PATH(m, D[n]) unrolled from the root down; the RFC lists it bottom-up,
    # hence the reversal. Only the first right sibling taken can be incomplete.
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            path.append(_range_root(start + k, end, hash_at))
            end = start + k
        else:
            path.append(_range_root(start, start + k, hash_at))
            start += k
    path.reverse()
    return path


def consistency_proof(size1: int, size2: int, hash_at: HashAt) -> list[bytes]:
    """RFC 9162 §2.1.4.1 PROOF(size1, D[0:size2]), bottom-up, from stored subtrees."""
    _require_size(size2)
    if not 0 < size1 <= size2:
        raise ProofError(f"no consistency proof from size {size1} to size {size2}")
    path: list[bytes] = []
    start, end, whole = 0, size2, True
    # SUBPROOF(m, D[n], b) unrolled from the root down, ``whole`` being b.
    while size1 != end:
        k = _split(end - start)
        if size1 <= start + k:
            path.append(_range_root(start + k, end, hash_at))
            end = start + k
        else:
            path.append(_range_root(start, start + k, hash_at))
            start += k
            whole = False
    if not whole:
        path.append(_range_root(start, end, hash_at))
    path.reverse()
    return path


# --- verification ----------------------------------------------------------------


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """RFC 9162 §2.1.3.2: return None if ``proof`` puts ``leaf`` at ``index``; raise ProofError."""
    _require_hash(root, "root hash")
    if inclusion_root(leaf, index, size, proof) != root:
        raise ProofError("inclusion proof does not lead to the root hash")


def inclusion_root(leaf: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """RFC 9162 §2.1.3.2 steps 1-5: the root ``proof`` leads to from ``leaf`` at ``index``
    in a tree of ``size``; ProofError when the proof's length does not fit the path.

    For a verifier that learns the root it must match only later (an audit bundle's
    signed tree head comes after its events): compare the result with it then."""
    _require_hash(leaf, "leaf hash")
    _require_proof(proof)
    # 1. The leaf must lie inside the tree.
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not in a tree of size {size}")
    # 2.
    fn, sn = index, size - 1
    # 3.
    r = leaf
    # 4.
    for p in proof:
        # 4a.
        if sn == 0:
            raise ProofError("inclusion proof is longer than the path to the root")
        # 4b.
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        # 4c.
        fn, sn = fn >> 1, sn >> 1
    # 5.
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the path to the root")
    return r


def verify_consistency(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes
) -> None:
    """RFC 9162 §2.1.4.2: return None if ``proof`` shows tree size1 is a prefix of size2.

    Like transparency-dev/merkle, a proof from the empty tree is rejected as
    meaningless: every tree extends it, so a caller holding a size-0
    checkpoint checks its root is EMPTY_ROOT instead.
    """
    _require_hash(root1, "first root hash")
    _require_hash(root2, "second root hash")
    _require_proof(proof)
    if not 0 <= size1 <= size2:
        raise ProofError(f"no consistency proof from size {size1} to size {size2}")
    if size1 == 0:
        raise ProofError("a consistency proof from the empty tree is meaningless")
    if size1 == size2:
        _verify_same_size(proof, root1, root2)
        return
    fr, sr = _consistency_roots(size1, size2, proof, root1)
    # 7.
    if fr != root1:
        raise ProofError("consistency proof does not lead to the first root hash")
    if sr != root2:
        raise ProofError("consistency proof does not lead to the second root hash")


def _verify_same_size(proof: Sequence[bytes], root1: bytes, root2: bytes) -> None:
    if proof:
        raise ProofError("consistency proof between equal sizes must be empty")
    if root1 != root2:
        raise ProofError("two trees of the same size have different root hashes")


def _consistency_roots(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes
) -> tuple[bytes, bytes]:
    """Steps 1-6 of RFC 9162 §2.1.4.2 (0 < size1 < size2): the roots (fr, sr) it yields."""
    # 1.
    if not proof:
        raise ProofError("consistency proof is empty")
    # 2. A power-of-two first tree is itself a node of the second: the proof omits it.
    path = [root1, *proof] if size1 & (size1 - 1) == 0 else list(proof)
    # 3.
    fn, sn = size1 - 1, size2 - 1
    # 4.
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    # 5.
    fr = sr = path[0]
    # 6.
    for c in path[1:]:
        # 6a.
        if sn == 0:
            raise ProofError("consistency proof is longer than needed")
        # 6b.
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        # 6c.
        fn, sn = fn >> 1, sn >> 1
    # 7 (the size part; the caller compares the roots).
    if sn != 0:
        raise ProofError("consistency proof is shorter than needed")
    return fr, sr


def _require_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} is {len(value)} bytes, not {HASH_SIZE}")


def _require_proof(proof: Sequence[bytes]) -> None:
    # Wrong-length hashes are rejected before any arithmetic: a truncated or
    # padded value must never be compared or chained as if it were a hash.
    for i, value in enumerate(proof):
        _require_hash(value, f"proof hash {i}")


def _require_size(size: int) -> None:
    if not 0 <= size <= _MAX_SIZE:
        raise ProofError(f"tree size {size} is outside 0..2**64-1")
