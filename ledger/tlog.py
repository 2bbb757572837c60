"""The ledger as a transparency log: leaves, stored subtrees, signed tree heads.

Pure glue between the ledger and ``ledger.merkle`` / ``ledger.note``:

* Leaf ``i`` (0-based) is the ledger entry at position ``i + 1``; its leaf
  hash is RFC 9162's ``SHA-256(0x00 ‖ entry_hash)`` over the entry's 32-byte
  chain hash (which already commits to the whole envelope).
* Adapters keep the frontier with the head and every complete subtree of
  ``2**STORED_LEVEL`` leaves or more; smaller ones are recomputed from at
  most ``2**STORED_LEVEL`` entry hashes when a proof needs them, so the tree
  costs about one stored hash per eight entries.
* Checkpoints are C2SP ``tlog-checkpoint`` signed notes, origin and key name
  ``agentmesh.ledger/<ledger DID>``, signed with the ledger key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from ledger.identity import VerifyKey
from ledger.merkle import HashAt, leaf_hash, node_hash
from ledger.note import ED25519, Checkpoint, Ed25519Verifier, key_id, sign_checkpoint
from ledger.signatures import Signer

__all__ = [
    "STORED_LEVEL",
    "entry_leaf",
    "needed_nodes",
    "origin",
    "perfect_root",
    "signed_tree_head",
    "verifier",
]

STORED_LEVEL = 4
"""Complete subtrees of 2**4 = 16 leaves and up are stored; smaller ones recomputed."""

T = TypeVar("T")


def origin(ledger_did: str) -> str:
    """The log's origin line and note key name."""
    return f"agentmesh.ledger/{ledger_did}"


def entry_leaf(entry_hash: bytes) -> bytes:
    """The leaf hash of a ledger entry."""
    return leaf_hash(entry_hash)


def signed_tree_head(key: Signer, size: int, root: bytes) -> str:
    """A C2SP checkpoint of the ledger's tree, signed with the ledger key."""
    name = origin(key.did)
    return sign_checkpoint(Checkpoint(name, size, root), _NoteSigner(name, key))


@dataclass(frozen=True, slots=True)
class _NoteSigner:
    """A note signer over any ``Signer`` (a key in memory, or a signing service)."""

    name: str
    signer: Signer

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, ED25519, self.signer.public.raw)

    def sign(self, text: bytes) -> bytes:
        return self.signer.sign(text)


def verifier(public: VerifyKey) -> Ed25519Verifier:
    """The note verifier of a ledger's checkpoints (``.vkey()`` is what witnesses pin)."""
    return Ed25519Verifier(origin(public.did), public)


def needed_nodes(compute: Callable[[HashAt], T]) -> set[tuple[int, int]]:
    """The ``(level, index)`` subtrees ``compute`` reads.

    Which nodes a proof or a root needs depends on sizes and indices only, never
    on hash values, so a dry run with placeholder hashes names them all; the
    adapter fetches them in one round trip and runs ``compute`` again."""
    wanted: set[tuple[int, int]] = set()

    def probe(level: int, index: int) -> bytes:
        wanted.add((level, index))
        return bytes(32)

    compute(probe)
    return wanted


def perfect_root(leaves: Iterable[bytes]) -> bytes:
    """The root of a complete subtree from its leaf hashes (a power of two of them)."""
    level = list(leaves)
    if not level or len(level) & (len(level) - 1):
        raise ValueError(f"a complete subtree has a power of two of leaves, not {len(level)}")
    while len(level) > 1:
        level = [node_hash(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]
