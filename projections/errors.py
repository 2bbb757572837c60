"""Exceptions of the projections package.

Tree::

    ProjectionError
    ├── DelegationError   a grant or revocation breaks a delegation rule (has ``reason``)
    ├── SnapshotError     a snapshot is malformed or was folded under another config
    ├── ReadStoreError    (projections.readstore) the read store failed or could not be reached
    ├── StaleWriteError   (projections.readstore) the store moved past the expected position
    ├── ReplayError       (projections.replay) a question the source cannot answer truthfully
    └── FoldTooLargeError (projections.history) a past moment's fold exceeds its limits

The four named with a module are defined beside the code that raises them.
"""

from __future__ import annotations


class ProjectionError(Exception):
    """Root of every error the projections raise."""


class DelegationError(ProjectionError):
    """A delegation rule rejects a grant or a revocation.

    ``reason`` is a stable code (e.g. ``"widening"``) the API can map to a
    problem type; the message says what happened in words.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class SnapshotError(ProjectionError):
    """A snapshot cannot be loaded: malformed, unknown format or another config."""
