"""What ``verify_bundle`` reports of a bundle it verified."""

from __future__ import annotations

from dataclasses import dataclass

from ledger.audit.bundle import Header, Manifest
from ledger.chain import Checkpoint

__all__ = ["BundleReport"]


@dataclass(frozen=True, slots=True)
class BundleReport:
    """A verified bundle: what it holds and what was checked."""

    header: Header
    manifest: Manifest
    checkpoint: Checkpoint | None
    events: int
    stubs: int
    keys: int
    signatures: int
    signatures_checked: bool
    tree_size: int | None = None
    """Set when every entry was proven in the Merkle tree of this many entries, whose
    root the checkpoint's signed tree head commits to."""
    trusted_size: int | None = None
    """Set when the bundle was held against a checkpoint seen before, of this size."""
    proofs: int = 0
    """Events whose own inclusion proof led to the signed tree head's root."""

    @property
    def ledger_did(self) -> str:
        return self.manifest.signer

    def summary(self) -> str:
        m = self.manifest
        if m.first_position is None:
            return (
                f"bundle OK: no events from {m.from_} to {m.to}, "
                f"manifest signed by {self.ledger_did}"
            )
        what = f"{self.events} events"
        if m.agent is not None:
            what += f" and {self.stubs} stubs for {m.agent}"
        unchecked = "" if self.signatures_checked else " (event signatures not checked)"
        tree = ""
        if self.tree_size is not None:
            tree = f", every entry proven in the signed Merkle tree of {self.tree_size}"
            if self.proofs:
                tree += f" ({self.proofs} events by their own inclusion proofs)"
        if self.trusted_size is not None:
            tree += f", consistent with the trusted checkpoint of {self.trusted_size}"
        return (
            f"bundle OK{unchecked}: {what} (positions {m.first_position}..{m.last_position}), "
            f"{self.keys} keys, checkpoint {m.checkpoint_position} signed by {self.ledger_did}"
            f"{tree}"
        )
