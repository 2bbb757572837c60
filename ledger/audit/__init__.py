"""Audit bundles: a time range of the ledger that anyone can verify offline.

Modules:
    bundle       -- the line types, header and manifest, the JSON Lines encoding, and
                    the checks the exporter and the verifier share (the format is
                    described there)
    cloudevents  -- the CloudEvents 1.0 flavour of the same lines; reading and writing
                    lines in either flavour
    chunks       -- checking a run of entry lines on a worker process
    proofs       -- per-event inclusion proofs: made batch by batch on export, followed
                    on verification
    verify       -- ``verify_bundle``: offline verification, naming the first bad line
    reader       -- ``read_bundle``: a bundle's entries, for replay
    export       -- ``export_bundle`` over an ``AuditSource``, signed by a ``Signer``

The package imports no database driver. ``export_bundle`` and ``prepare_export``
below take a ledger (``ledger.ports.LedgerReader``, PostgreSQL only) and a
``ledger.signatures.Signer``: they are ``ledger.postgres_audit``'s, loaded on
first use so that importing the verifier never loads the driver; the ones over
any ``AuditSource`` are ``ledger.audit.export``'s.

Errors (all under ``ledger.errors.LedgerError``)::

    LedgerError
    ├── VerificationError
    │   └── BundleVerificationError  a bundle line is bad (has ``line`` and ``position``)
    └── LineError                    a line is not a bundle line (internal: reported as a
                                     BundleVerificationError with its line number)

Export also raises ``ValueError`` for bad arguments, ``VerificationError`` when
the stored ledger does not verify and ``StoreUnavailableError`` when the
database fails; verification raises ``OSError`` when a path cannot be read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ledger.audit.bundle import (
    MEDIA_TYPE,
    BundleVerificationError,
    Flavour,
    Manifest,
    parse_flavour,
)
from ledger.audit.cloudevents import CE_PREFIX
from ledger.audit.reader import read_bundle
from ledger.audit.verify import BundleReport, verify_bundle

if TYPE_CHECKING:
    from ledger.postgres_audit import export_bundle, prepare_export

__all__ = [
    "CE_PREFIX",
    "MEDIA_TYPE",
    "BundleReport",
    "BundleVerificationError",
    "Flavour",
    "Manifest",
    "export_bundle",
    "parse_flavour",
    "prepare_export",
    "read_bundle",
    "verify_bundle",
]

_POSTGRES = ("export_bundle", "prepare_export")


def __getattr__(name: str) -> object:
    """``export_bundle`` and ``prepare_export`` over PostgreSQL, imported on first use."""
    if name in _POSTGRES:
        from ledger import postgres_audit  # the driver loads only for an export

        return getattr(postgres_audit, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
