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
    report       -- ``BundleReport``: what a verified bundle holds
    reader       -- ``read_bundle``: a bundle's entries, for replay
    export       -- ``export_bundle`` over an ``AuditSource``, signed by a ``Signer``

The package imports no database driver. ``export_bundle`` and ``prepare_export``
take an ``AuditSource``, or a ledger that names its own (``Exportable``: on
PostgreSQL, ``PostgresLedgerReader.audit_source()``, ``ledger/postgres/audit.py``),
and a ``ledger.signatures.Signer``.

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

from ledger.audit.bundle import (
    MEDIA_TYPE,
    BundleVerificationError,
    Flavour,
    Manifest,
    parse_flavour,
)
from ledger.audit.cloudevents import CE_PREFIX
from ledger.audit.export import Exportable, export_bundle, prepare_export
from ledger.audit.reader import read_bundle
from ledger.audit.report import BundleReport
from ledger.audit.verify import verify_bundle

__all__ = [
    "CE_PREFIX",
    "MEDIA_TYPE",
    "BundleReport",
    "BundleVerificationError",
    "Exportable",
    "Flavour",
    "Manifest",
    "export_bundle",
    "parse_flavour",
    "prepare_export",
    "read_bundle",
    "verify_bundle",
]
