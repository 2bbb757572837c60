"""Per-event inclusion proofs in a bundle: made batch by batch on export, checked line by
line on verification.

Every event a bundle shows carries its RFC 9162 §2.1.3 audit path in the tree of
``tree_size`` entries, the size of the bundle's signed tree head (the checkpoint at
its last position). On export (``BatchProver``) the path of leaf ``i`` is made from:

* its left siblings: the perfect subtrees left of ``i``, i.e. the tree's edge before
  the batch (which the exporter keeps anyway for the range proof) and the batch's own
  leaves;
* its right siblings: the batch's leaves where they reach, else complete subtrees
  of the ledger past the batch, read from the store in one round trip per batch
  (``AuditSource.tree_nodes``: stored subtrees of 16+ leaves, smaller ones rebuilt
  from at most 16 entry hashes).

Which subtrees a path needs depends on sizes and indices only, so a dry run names
them (``ledger.tlog.needed_nodes``' idea) before they are fetched.
"""

from __future__ import annotations

import binascii
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

from ledger import merkle
from ledger.errors import ProofError
from ledger.merkle import Frontier

Nodes = dict[tuple[int, int], bytes]
FetchNodes = Callable[[set[tuple[int, int]]], Awaitable[Nodes]]


class BatchProver:
    """Audit paths in the tree of ``tree_size`` leaves for the leaves of one batch.

    ``before`` is the tree's edge over the leaves before the batch, ``leaves`` the
    batch's leaf hashes in order. Subtrees fetched from the store are kept in
    ``fetched`` (shared between batches: the big right siblings recur).

    The path of leaf ``i`` is, bottom-up, the node ``(level, (i >> level) ^ 1)`` of
    every level at which that sibling exists (RFC 9162 §2.1.3.1 read on the
    left-balanced tree: node ``(level, j)`` covers leaves ``j << level`` up to
    ``(j + 1) << level`` or the tree's end, and a node without a right child is its
    left child). Every node is worked out once per batch and the batch's paths share
    them, so a path costs one dictionary look-up per level, not a walk from the root.
    """

    def __init__(self, tree_size: int, before: Frontier, leaves: Sequence[bytes], fetched: Nodes):
        if not 0 <= tree_size <= 2**63 - 1:
            raise ProofError(f"tree size {tree_size} is not a size")
        self.tree_size = tree_size
        self.start = before.size
        self.end = before.size + len(leaves)
        self.fetched = fetched
        self.local: Nodes = {}
        for level, index in _cover(before.size):
            self.local[(level, index)] = before.hashes[len(self.local)]
        for offset, leaf in enumerate(leaves):
            self.local[(0, self.start + offset)] = leaf
        self.missing: set[tuple[int, int]] | None = None  # collects, on a dry run
        self.paths: dict[int, list[bytes]] = {}  # the dry run's paths that came out whole
        last = tree_size - 1
        self.limits = [last >> level for level in range(last.bit_length())]

    def _node(self, level: int, index: int) -> bytes | None:
        """Node (level, index) of the tree: from the batch and the edge before it where
        it lies within them, else from ``fetched``; None (noted in ``missing``) when
        the store must supply it. Memoised."""
        key = (level, index)
        known = self.local.get(key)
        if known is not None:
            return known
        high = (index + 1) << level
        if high > self.tree_size:  # the rightmost node, incomplete: built from its children
            value = self._node(level - 1, 2 * index)
            if (2 * index + 1) << (level - 1) < self.tree_size:  # it has a right child
                right = self._node(level - 1, 2 * index + 1)  # (asked for on a dry run too)
                value = None if value is None or right is None else merkle.node_hash(value, right)
        elif level == 0 or high > self.end or high <= self.start:
            # a leaf past the batch, a subtree reaching past it, or one wholly before it
            # and not on the edge: the store's
            value = self.fetched.get(key)
            if value is None and self.missing is not None:
                self.missing.add(key)
            return value
        else:  # within the batch and the edge before it
            left = self._node(level - 1, 2 * index)
            right = self._node(level - 1, 2 * index + 1)
            value = None if left is None or right is None else merkle.node_hash(left, right)
        if value is not None:
            self.local[key] = value
        return value

    def _path(self, leaf_index: int) -> list[bytes | None]:
        if not 0 <= leaf_index < self.tree_size:
            raise ProofError(f"leaf index {leaf_index} is not in a tree of size {self.tree_size}")
        local, node = self.local, self._node
        path: list[bytes | None] = []
        for level, limit in enumerate(self.limits):
            sibling = (leaf_index >> level) ^ 1
            if sibling <= limit:
                path.append(local.get((level, sibling)) or node(level, sibling))
        return path

    def needed(self, leaf_indexes: Sequence[int]) -> set[tuple[int, int]]:
        """The subtrees the paths of ``leaf_indexes`` need from the store."""
        self.missing = set()
        try:
            for index in leaf_indexes:
                path = self._path(index)
                if None not in path:
                    self.paths[index] = cast(list[bytes], path)
            return self.missing
        finally:
            self.missing = None

    def proof(self, leaf_index: int) -> list[bytes]:
        """The audit path of leaf ``leaf_index``; ProofError if a subtree is missing."""
        known = self.paths.get(leaf_index)
        if known is not None:
            return known
        path = self._path(leaf_index)
        if None in path:
            wanted = self.needed([leaf_index])
            level, index = min(wanted)
            raise ProofError(f"subtree ({level}, {index}) is not available")
        return cast(list[bytes], path)


async def batch_proofs(
    tree_size: int,
    before: Frontier,
    leaves: Sequence[bytes],
    leaf_indexes: Sequence[int],
    fetched: Nodes,
    fetch: FetchNodes,
) -> list[list[bytes]]:
    """The audit paths of ``leaf_indexes`` (within the batch), fetching what the store
    must supply in one call."""
    for key in [k for k in fetched if (k[1] + 1) << k[0] <= before.size]:
        del fetched[key]  # wholly before the batch: no later path needs it
    prover = BatchProver(tree_size, before, leaves, fetched)
    wanted = prover.needed(leaf_indexes)
    if wanted:
        fetched.update(await fetch(wanted))
    return [prover.proof(index) for index in leaf_indexes]


def _cover(size: int) -> list[tuple[int, int]]:
    """(level, index) of the edge's perfect subtrees over ``size`` leaves, largest first."""
    out: list[tuple[int, int]] = []
    start = 0
    for level in range(size.bit_length() - 1, -1, -1):
        if (size >> level) & 1:
            out.append((level, start >> level))
            start += 1 << level
    return out


class RootMemo:
    """The root each event's audit path leads to (RFC 9162 §2.1.3.2 steps 1-5, as
    ``ledger.merkle.inclusion_root``), remembering the states (position in the tree,
    hash so far, hashes still to apply) of the paths already followed.

    Paths of nearby events meet a few levels up; from the state where one meets a
    path already followed with the same hash and the same remaining hashes (compared
    as text), the outcome is that path's, so a run of consecutive events costs about
    two SHA-256 each instead of one per level. Every hash the path consumes before
    that is decoded and length-checked."""

    def __init__(self) -> None:
        self.states: dict[tuple[int, int, int], tuple[bytes, int, list[str], bytes]] = {}

    def root(self, leaf: bytes, index: int, size: int, hashes: list[str]) -> bytes:
        if not 0 <= index < size:
            raise ProofError(f"leaf index {index} is not in a tree of size {size}")
        fn, sn, r = index, size - 1, leaf
        followed: list[tuple[int, int, bytes, int]] = []
        root: bytes | None = None
        for k, text in enumerate(hashes):
            if sn == 0:
                raise ProofError("inclusion proof is longer than the path to the root")
            seen = self.states.get((size, fn, sn))
            if seen is not None and seen[0] == r and seen[2][seen[1] :] == hashes[k:]:
                root = seen[3]
                break
            p = binascii.a2b_base64(text, strict_mode=True)
            if len(p) != merkle.HASH_SIZE:
                raise ProofError(
                    f"inclusion proof hash {k} is {len(p)} bytes, not {merkle.HASH_SIZE}"
                )
            followed.append((fn, sn, r, k))
            if fn & 1 or fn == sn:
                r = merkle.node_hash(p, r)
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
            else:
                r = merkle.node_hash(r, p)
            fn, sn = fn >> 1, sn >> 1
        if root is None:
            if sn != 0:
                raise ProofError("inclusion proof is shorter than the path to the root")
            root = r
        for fn, sn, r, k in followed:
            self.states[(size, fn, sn)] = (r, k, hashes, root)
        return root
