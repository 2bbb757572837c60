"""Signature checks of the PostgreSQL writer, before the commit.

Each event is verified against the key its actor is believed to hold (agents'
keys are read once and kept; Ed25519 verification releases the GIL, so large
batches are verified on worker threads, up to ``_VERIFY_INLINE`` on the loop). The
key used is recorded on the request; the commit compares it with the actor's
current key under the guard (``ledger.postgres.batch``), so a rotation racing
the append cannot let a retired key through.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import asyncpg

from ledger.errors import LedgerError, SignatureError, StoreUnavailableError
from ledger.events import AgentRegistered
from ledger.identity import SigningKey, VerifyKey
from ledger.postgres.batch import Request
from ledger.postgres.reader import DRIVER_ERRORS as _DRIVER_ERRORS
from ledger.signed import SignedEvent

log = logging.getLogger("agentmesh.ledger")

# Ed25519 verification releases the GIL: one thread per core.
_VERIFY_THREADS = max(os.cpu_count() or 1, 1)
# Up to this many signatures are verified on the event loop (~50-60 µs each, so a
# few ms at most). Handing a batch of single reports to the threads cost more CPU
# than the checks themselves: each check gives up the GIL and takes it back against a
# busy loop (bench/api.py, 64 connections of single reports: ~80 µs of the API's
# CPU a report more; on the loop the rate rose 3-22 % and the open loop's p50 and
# p99 fell). Bigger batches (``POST /v1/reports:batch``) still use both cores.
_VERIFY_INLINE = 64


class Signers:
    """The keys this process believes agents hold, and the checks against them."""

    def __init__(self, pool: asyncpg.Pool, ledger_key: SigningKey) -> None:
        self._pool = pool
        self._ledger = ledger_key
        self.keys: dict[str, bytes] = {}  # did -> raw public key
        self._verify_keys: dict[bytes, VerifyKey] = {}  # parsed once per key, not per event
        self._threads = ThreadPoolExecutor(
            max_workers=_VERIFY_THREADS, thread_name_prefix="ed25519"
        )

    async def verify_loop(
        self,
        incoming: asyncio.Queue[Request],
        verified: asyncio.Queue[Request],
        fail: Callable[[list[Request], LedgerError], None],
    ) -> None:
        """Verify queued appends in bulk, then hand them to the flusher.

        One thread hand-off per batch rather than per append: per-call
        hand-offs convoy on the GIL and starve group commit of large batches.
        """
        while True:
            batch = [await incoming.get()]
            while not incoming.empty():
                batch.append(incoming.get_nowait())
            try:
                await self.verify(batch)
            except LedgerError as exc:
                fail(batch, exc)
            except Exception as exc:  # never let the verifier die with callers waiting
                log.exception("ledger_verifier_error")
                fail(batch, StoreUnavailableError(f"append not verified: {exc}"))
            for request in batch:
                if not request.future.done():
                    verified.put_nowait(request)
                incoming.task_done()

    def close(self) -> None:
        self._threads.shutdown(wait=False)

    def verified_here(self, request: Request) -> bool:
        """Verify a small request on the loop when every signer's key is known here;
        False sends it the long way (key lookups, re-checks, error answers)."""
        if len(request.events) > _VERIFY_INLINE:
            return False
        keys = {}
        for signed in request.events:
            if signed.actor not in self.keys and signed.actor != self._ledger.did:
                return False
            try:
                key = self._believed_key(signed)
            except LedgerError:
                return False
            if not key.is_valid(signed.signature, signed.body):
                return False
            keys[signed.actor] = key.raw
        request.keys_used.update(keys)
        return True

    async def verify(self, batch: list[Request]) -> None:
        await self._load_keys({e.actor for r in batch for e in r.events})
        jobs: list[tuple[Request, SignedEvent, VerifyKey]] = []
        for request in batch:
            try:
                jobs.extend((request, e, self._believed_key(e)) for e in request.events)
            except LedgerError as exc:
                request.future.set_exception(exc)
        jobs = [j for j in jobs if not j[0].future.done()]
        if len(jobs) <= _VERIFY_INLINE:
            # A few: verifying here costs less than the trip to a thread.
            chunks, results = [jobs], [_verify_all(jobs)]
        else:
            loop = asyncio.get_running_loop()
            chunks = [jobs[i::_VERIFY_THREADS] for i in range(_VERIFY_THREADS)]
            results = await asyncio.gather(
                *(loop.run_in_executor(self._threads, _verify_all, chunk) for chunk in chunks)
            )
        for chunk, valid in zip(chunks, results, strict=True):
            for (request, signed, key), ok in zip(chunk, valid, strict=True):
                if request.future.done():
                    continue
                if not ok:
                    fresh = await self._recheck(signed)
                    if fresh is None:
                        request.future.set_exception(
                            SignatureError(
                                f"{signed.type}: signature by {signed.actor} does not verify"
                            )
                        )
                        continue
                    key = fresh
                request.keys_used[signed.actor] = key.raw

    async def _recheck(self, signed: SignedEvent) -> VerifyKey | None:
        """Our cached key may be stale (rotated by another process): ask once more."""
        if signed.actor == self._ledger.did or isinstance(signed.event, AgentRegistered):
            return None
        fresh = await self._fetch_key(signed.actor)
        if fresh is None or not VerifyKey.from_raw(fresh).is_valid(signed.signature, signed.body):
            return None
        return VerifyKey.from_raw(fresh)

    async def _load_keys(self, dids: set[str]) -> None:
        missing = [d for d in dids if d not in self.keys and d != self._ledger.did]
        if not missing:
            return
        try:
            rows = await self._pool.fetch(
                "SELECT did, public_key FROM agent_keys WHERE did = ANY($1::text[])", missing
            )
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot read agent keys: {exc}") from exc
        for row in rows:
            self.keys[row["did"]] = bytes(row["public_key"])

    def _believed_key(self, signed: SignedEvent) -> VerifyKey:
        event = signed.event
        if signed.actor == self._ledger.did:
            return self._ledger.public
        if isinstance(event, AgentRegistered) and event.actor == event.did:
            # Self-registration proves possession of the key being registered.
            return VerifyKey.from_pem(event.public_key)
        raw = self.keys.get(signed.actor)
        if raw is None:
            raise SignatureError(f"{signed.type}: unknown signer {signed.actor}")
        key = self._verify_keys.get(raw)
        if key is None:
            key = self._verify_keys[raw] = VerifyKey.from_raw(raw)
        return key

    async def _fetch_key(self, did: str) -> bytes | None:
        try:
            value = await self._pool.fetchval(
                "SELECT public_key FROM agent_keys WHERE did = $1", did
            )
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailableError(f"cannot read agent keys: {exc}") from exc
        if value is not None:
            self.keys[did] = bytes(value)
            return bytes(value)
        return None


def _verify_all(jobs: Sequence[tuple[object, SignedEvent, VerifyKey]]) -> list[bool]:
    return [key.is_valid(signed.signature, signed.body) for _, signed, key in jobs]
