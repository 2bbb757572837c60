"""The ledger's keys over its history — pure, no I/O.

The ledger's key is recorded at genesis and changes only by a
``ledger.key_rotated`` entry: signed by the key it retires (``previous_key``),
carrying the new key's ``proof``. The history is the ledger itself: the rotation
entries, in position order. A key is *in force at position N* when it is the
genesis key and no rotation is at or before N, or the key of the last rotation at
or before N — so a checkpoint (or tree head) of N entries that include a rotation
is signed by the key that rotation installed, and the retired key signs nothing
from the rotation on.

Each rotation carries the old key and is signed by it, and the new key's proof
names the old key's DID: from any key of the history, the chain of rotations
links every other, both ways. So a verifier may pin the genesis key or any later
one (``LedgerKeys.require``), and a witness that pinned the old key crosses to the
new one only with the rotation entry, proven in the new checkpoint's tree
(``cross``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ledger import authority, merkle, tlog
from ledger.chain import Entry, entry_hash
from ledger.errors import LedgerError, ProofError, VerificationError
from ledger.events import LedgerKeyRotated, decode_body
from ledger.identity import VerifyKey

__all__ = ["LedgerKeys", "ProvenRotation", "cross", "history", "rotation_of"]


@dataclass(frozen=True, slots=True)
class LedgerKeys:
    """The genesis key, then each rotation's position and the key it installed."""

    genesis: VerifyKey
    rotations: tuple[tuple[int, VerifyKey], ...] = ()

    @property
    def current(self) -> VerifyKey:
        return self.rotations[-1][1] if self.rotations else self.genesis

    def at(self, position: int) -> VerifyKey:
        """The key in force at ``position`` (a rotation at ``position`` counts)."""
        key = self.genesis
        for rotated_at, new in self.rotations:
            if rotated_at > position:
                break
            key = new
        return key

    def all(self) -> list[VerifyKey]:
        return [self.genesis, *(key for _, key in self.rotations)]

    def require(self, pinned: VerifyKey) -> None:
        """Return None if ``pinned`` was ever this ledger's key; raise otherwise."""
        if all(key.raw != pinned.raw for key in self.all()):
            known = ", ".join(key.did for key in self.all())
            raise VerificationError(
                0,
                f"ledger key mismatch: {pinned.did} was never this ledger's key "
                f"(its keys: {known})",
            )


def rotation_of(entry: Entry) -> LedgerKeyRotated:
    """A rotation entry checked by itself: a ``ledger.key_rotated`` signed by its
    ``previous_key`` (the ledger's DID before it), with the new key's proof."""
    try:
        event = decode_body(entry.body)
        if not isinstance(event, LedgerKeyRotated):
            raise VerificationError(entry.position, "not a ledger.key_rotated entry")
        authority.check_ledger_rotation(event, entry.body)
        VerifyKey.from_pem(event.previous_key).verify(entry.signature, entry.body)
    except VerificationError:
        raise
    except LedgerError as exc:
        raise VerificationError(entry.position, f"ledger key rotation: {exc}") from exc
    return event


def history(rotations: Sequence[Entry], current: VerifyKey | None = None) -> LedgerKeys:
    """The ledger's keys from its rotation entries (position order), each checked and
    linked to the one before; ``current`` (the recorded identity) must be the last."""
    if not rotations:
        if current is None:
            raise VerificationError(0, "the ledger has no recorded key")
        return LedgerKeys(current)
    events = [rotation_of(entry) for entry in rotations]
    keys = LedgerKeys(VerifyKey.from_pem(events[0].previous_key))
    chain: list[tuple[int, VerifyKey]] = []
    for entry, event in zip(rotations, events, strict=True):
        if event.actor != (chain[-1][1] if chain else keys.genesis).did:
            raise VerificationError(
                entry.position, f"ledger key rotation signed by {event.actor}, not the ledger key"
            )
        chain.append((entry.position, VerifyKey.from_pem(event.public_key)))
    keys = LedgerKeys(keys.genesis, tuple(chain))
    if current is not None and current.raw != keys.current.raw:
        raise VerificationError(
            0,
            f"ledger key mismatch: the ledger records {current.did} as its key, "
            f"its last rotation installed {keys.current.did}",
        )
    return keys


@dataclass(frozen=True, slots=True)
class ProvenRotation:
    """A rotation entry and its RFC 9162 inclusion proof in a tree of ``tree_size``."""

    entry: Entry
    tree_size: int
    proof: tuple[bytes, ...]


def cross(
    trusted: VerifyKey,
    accepted_size: int,
    root: bytes,
    tree_size: int,
    proven: Sequence[ProvenRotation],
) -> VerifyKey:
    """The key a witness that trusts ``trusted`` (and accepted a tree of
    ``accepted_size``) may accept a tree of ``tree_size`` with root ``root`` under:
    follow every rotation after the accepted tree, each signed by the key trusted so
    far, with the new key's proof, its entry hash recomputed from its envelope and
    proven in that tree. Raise ``VerificationError`` on anything else."""
    key = trusted
    for item in sorted(proven, key=lambda p: p.entry.position):
        entry = item.entry
        if entry.position <= accepted_size:
            continue  # before the accepted tree: it was under a key already trusted
        if item.tree_size != tree_size or entry.position > tree_size:
            raise VerificationError(
                entry.position, f"rotation not proven in the tree of {tree_size}"
            )
        if entry_hash(entry.prev_hash, entry.envelope()) != entry.entry_hash:
            raise VerificationError(
                entry.position, "rotation entry hash does not match its content"
            )
        event = rotation_of(entry)
        if event.actor != key.did:
            raise VerificationError(
                entry.position, f"rotation signed by {event.actor}, not the trusted {key.did}"
            )
        try:
            merkle.verify_inclusion(
                tlog.entry_leaf(entry.entry_hash), entry.position - 1, tree_size, item.proof, root
            )
        except ProofError as exc:
            raise VerificationError(entry.position, f"rotation inclusion proof: {exc}") from exc
        key = VerifyKey.from_pem(event.public_key)
    return key
