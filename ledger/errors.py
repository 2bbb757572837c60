"""Exceptions of the ledger package.

Tree::

    LedgerError
    ├── EventValidationError     malformed body, unknown type, bad payload
    ├── SignatureError           bad signature, unknown signer, wrong key
    │   └── NoteError            malformed or unverified signed note / checkpoint
    ├── ConcurrencyError         expected stream version did not match
    ├── IdempotencyConflictError key reused with different content
    ├── LedgerKeyMismatchError   a process holds another key than the ledger's own
    ├── NotPermittedError        the signer may not write this (suspended, wrong role)
    ├── AppendRejectedError      the event contradicts ledger state (e.g. duplicate DID)
    │   └── ReplayError          an event with this (signer, event_id) is already recorded
    ├── VerificationError        chain, signature or checkpoint check failed (has ``position``)
    │   └── BundleVerificationError  (ledger.audit) a bundle line is bad (has ``line``)
    ├── StoreUnavailableError    the database could not be reached or failed
    ├── ProofError               Merkle proof malformed, does not verify, or not possible
    ├── RetentionError           (ledger.retention) refused to run or could not finish
    └── LineError                (ledger.audit) not a bundle line (internal)

The three named with a module are defined beside the code that raises them.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Root of every error the ledger raises."""


class EventValidationError(LedgerError):
    """An event body or payload is malformed or of an unknown type."""


class SignatureError(LedgerError):
    """A signature is missing, malformed, by an unknown signer or does not verify."""


class ConcurrencyError(LedgerError):
    """Optimistic concurrency: the stream is not at the expected version."""

    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(
            f"stream {stream_id!r} is at version {actual}, append expected version {expected}"
        )
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class IdempotencyConflictError(LedgerError):
    """An idempotency key was reused for different events."""


class AppendRejectedError(LedgerError):
    """The events are well-formed and signed but contradict the ledger's state."""


class LedgerKeyMismatchError(LedgerError):
    """The process holds another key than the one the ledger recorded at genesis."""


class NotPermittedError(LedgerError):
    """The signer is known, but the trust model does not let it write this event."""


class ReplayError(AppendRejectedError):
    """A signed body already in the ledger was submitted again (single use)."""


class VerificationError(LedgerError):
    """Verification failed at ``position`` for ``reason``."""

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(f"position {position}: {reason}")
        self.position = position
        self.reason = reason


class StoreUnavailableError(LedgerError):
    """The database failed; the append was not acknowledged and may be retried."""


class NoteError(SignatureError):
    """A signed note, checkpoint or cosignature is malformed or has no valid known signature."""


class ProofError(LedgerError):
    """A Merkle inclusion or consistency proof is malformed, does not verify, or cannot exist."""
