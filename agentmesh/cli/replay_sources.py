"""Where a replay reads its events: the live ledger (from its retention start)
or a verified audit bundle."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from agentmesh.cli.common import CliError
from ledger.identity import VerifyKey
from ledger.timefmt import parse_time

if TYPE_CHECKING:
    from ledger.ports import LedgerReader
    from projections.config import TrustConfig
    from projections.replay import ReplaySource

# Entries read per query from the live ledger.
BATCH = 10_000


async def ledger_source(reader: LedgerReader, config: TrustConfig) -> ReplaySource:
    """The live ledger, streamed; after a retention cut, from the cut's snapshot on
    (``projections.start``; an unusable snapshot raises ``SnapshotError``)."""
    # Lazy: the projections' replay and fold (~55 ms), for the replay commands only.
    from projections.replay import ReplaySource
    from projections.start import ledger_start

    start = await ledger_start(reader)
    if start.snapshot is None:
        return ReplaySource(reader.iter_entries(batch=BATCH))
    initial = start.state(config)
    entries = reader.iter_entries(after=start.position, batch=BATCH)
    return ReplaySource(entries, initial, start.cut_time)


def bundle_source(path: Path) -> ReplaySource:
    """An audit export bundle (``agentmesh audit export``): its key entries and events
    merged by position. Only a bundle from the ledger's first entry holds every
    event a score depends on; its exclusive ``to`` ends what it can answer."""
    # Lazy: the audit package and the projections' replay (~90 ms together).
    from ledger.audit import read_bundle, verify_bundle
    from projections.replay import ReplaySource, merge_by_position

    try:
        # An incident review must not rest on a tampered bundle: verify it first.
        verify_bundle(path)
        bundle = read_bundle(path)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    if bundle.manifest is None:
        raise CliError(f"{path} has no manifest: the bundle is incomplete")
    first = bundle.manifest.first_position
    if first != 1:
        where = "no entries" if first is None else f"entries from position {first} on"
        raise CliError(
            f"{path} holds {where}: replay needs a bundle from the ledger's first entry "
            "(export it with a --from before the first event)"
        )
    events = list(merge_by_position(bundle.keys, bundle.events))
    return ReplaySource(
        events,
        window_end=parse_time(bundle.header.to),
        agent=bundle.header.agent,
        ledger_did=VerifyKey.from_pem(bundle.header.ledger_public_key).did,
    )
