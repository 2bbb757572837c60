"""``RedisProjectionStore``: projections in Redis, shared by API replicas and sidecars.

Layout under a prefix (default ``agentmesh:``)::

    current                 -> generation id
    g:<gen>:meta            hash: position, json (the Meta)
    g:<gen>:agents          hash: did -> agent document
    g:<gen>:grants          hash: grant id -> grant document
    g:<gen>:index           sorted set of DIDs (all scores 0: lexicographic paging)
    changes                 pub/sub channel of change notifications

Every read and write is one Lua script, so it sees one generation and is
atomic. A write compares (generation, position) before applying: the
projector's position is stored in the same atomic step as the state derived
from it (exactly-once), and a second writer or a swapped-in rebuild turns a
stale write into ``StaleWriteError`` instead of a silent overwrite. The same
script publishes the write's change notification: one round trip, and no
change announced without its write. A rebuild
fills a fresh generation (its keys expire unless swapped in, so a crashed
rebuild leaves nothing behind) and swaps ``current`` in one step.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, ResponseError

from projections.documents import Batch, Change, Meta, decode, encode
from projections.readstore import (
    HEARTBEAT,
    SUBSCRIBED,
    Closure,
    ReadStoreError,
    StaleWriteError,
    read_change,
)

_PENDING_TTL = 24 * 3600
# Seconds a command's answer may take before the connection is taken for dead (a
# server gone without a reset, as a rescheduled pod's old address): the command is
# retried on a new connection, then fails, instead of hanging its request forever.
# Far above anything a command here takes (a rebuild's pipeline answers as it goes).
COMMAND_TIMEOUT = 10.0
_CHUNK = 1000

_META = """
local gen = redis.call('GET', KEYS[1])
if not gen then return false end
return redis.call('HGET', ARGV[1] .. 'g:' .. gen .. ':meta', 'json')
"""

_HMGET = """
local gen = redis.call('GET', KEYS[1])
if not gen then return {} end
return redis.call('HMGET', ARGV[1] .. 'g:' .. gen .. ':' .. ARGV[2], unpack(ARGV, 3))
"""

# An agent's closure (``ProjectionStore.agent_closure``): its document, the grants to it
# and their ancestors, the delegators' documents; as {doc, {id, doc, …}, {did, doc, …}}.
# Agent documents are written with sorted keys, so one starts with its ``grants_in``
# (grant ids are [A-Za-z0-9_-]): read without decoding the document, whose peer windows
# are most of it; a grant document is small and decoded whole.
_CLOSURE = """
local gen = redis.call('GET', KEYS[1])
if not gen then return {} end
local base = ARGV[1] .. 'g:' .. gen .. ':'
local doc = redis.call('HGET', base .. 'agents', ARGV[2])
if not doc then return {} end
local function hmget(key, ids)
  local found = {}
  for i = 1, #ids, 1000 do
    local part = redis.call('HMGET', key, unpack(ids, i, math.min(i + 999, #ids)))
    for j = 1, #part do found[#found + 1] = part[j] end
  end
  return found
end
local ids = {}
local listed = string.match(doc, '^{"grants_in":%[([^%]]*)%]')
if listed then
  for id in string.gmatch(listed, '"([^"]*)"') do ids[#ids + 1] = id end
else
  ids = cjson.decode(doc)['grants_in'] or {}
end
local grants, delegators, seen, named = {}, {}, {}, {[ARGV[2]] = true}
for _, id in ipairs(ids) do seen[id] = true end
local wanted = ids
for _ = 1, 2 do
  local ancestors = {}
  if #wanted > 0 then
    local docs = hmget(base .. 'grants', wanted)
    for i = 1, #wanted do
      if docs[i] then
        grants[#grants + 1] = wanted[i]
        grants[#grants + 1] = docs[i]
        local grant = cjson.decode(docs[i])
        for _, id in ipairs(grant['chain']) do
          if not seen[id] then
            seen[id] = true
            ancestors[#ancestors + 1] = id
          end
        end
        local delegator = grant['delegator']
        if not named[delegator] then
          named[delegator] = true
          delegators[#delegators + 1] = delegator
        end
      end
    end
  end
  wanted = ancestors
end
local agents = {}
if #delegators > 0 then
  local docs = hmget(base .. 'agents', delegators)
  for i = 1, #delegators do
    if docs[i] then
      agents[#agents + 1] = delegators[i]
      agents[#agents + 1] = docs[i]
    end
  end
end
return {doc, grants, agents}
"""

_PAGE = """
local gen = redis.call('GET', KEYS[1])
if not gen then return {} end
local base = ARGV[1] .. 'g:' .. gen .. ':'
local dids = redis.call('ZRANGEBYLEX', base .. 'index', ARGV[2], '+', 'LIMIT', 0, ARGV[3])
if #dids == 0 then return {} end
local docs = redis.call('HMGET', base .. 'agents', unpack(dids))
local found, lengths = {}, {}
for i = 1, #dids do
  if docs[i] then
    found[#found + 1] = dids[i]
    lengths[#lengths + 1] = #docs[i]
  else
    docs[i] = ''
  end
end
return {table.concat(found, ','), table.concat(docs), table.concat(lengths, ',')}
"""

_SCAN = """
local found = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local values, lengths = {}, {}
for i = 2, #found[2], 2 do
  values[#values + 1] = found[2][i]
  lengths[#lengths + 1] = #found[2][i]
end
return {found[1], table.concat(values), table.concat(lengths, ',')}
"""

_COMMIT = """
local gen = redis.call('GET', KEYS[1])
if gen ~= ARGV[2] then return redis.error_reply('STALE generation') end
local base = ARGV[1] .. 'g:' .. gen .. ':'
if redis.call('HGET', base .. 'meta', 'position') ~= ARGV[3] then
  return redis.error_reply('STALE position')
end
local i = 7
for _ = 1, tonumber(ARGV[6]) do
  redis.call('HSET', base .. 'agents', ARGV[i], ARGV[i + 1])
  redis.call('ZADD', base .. 'index', 0, ARGV[i])
  i = i + 2
end
local grants = tonumber(ARGV[i]); i = i + 1
for _ = 1, grants do
  redis.call('HSET', base .. 'grants', ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('HSET', base .. 'meta', 'position', ARGV[4], 'json', ARGV[5])
if ARGV[i] ~= '' then redis.call('PUBLISH', ARGV[1] .. 'changes', ARGV[i]) end
return 1
"""

_SWAP = """
local old = redis.call('GET', KEYS[1])
local base = ARGV[1] .. 'g:' .. ARGV[2] .. ':'
for _, suffix in ipairs({'meta', 'agents', 'grants', 'index'}) do
  redis.call('PERSIST', base .. suffix)
end
redis.call('SET', KEYS[1], ARGV[2])
if old and old ~= ARGV[2] then
  local oldbase = ARGV[1] .. 'g:' .. old .. ':'
  redis.call('UNLINK', oldbase .. 'meta', oldbase .. 'agents', oldbase .. 'grants',
             oldbase .. 'index')
end
return old
"""


class RedisProjectionStore:
    name = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str = "agentmesh:",
        *,
        also_close: Sequence[aioredis.Redis] = (),
    ) -> None:
        self._redis = client
        self._also_close = tuple(also_close)
        self._prefix = prefix
        self._current_key = prefix + "current"
        self._meta_script = client.register_script(_META)
        self._hmget_script = client.register_script(_HMGET)
        self._closure_script = client.register_script(_CLOSURE)
        self._page_script = client.register_script(_PAGE)
        self._scan_script = client.register_script(_SCAN)
        self._commit_script = client.register_script(_COMMIT)
        self._swap_script = client.register_script(_SWAP)
        self._waiting: list[tuple[str, asyncio.Future[bytes | None]]] = []
        self._batches: set[asyncio.Future[None]] = set()
        self.heartbeat = HEARTBEAT

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        password: str | None = None,
        prefix: str = "agentmesh:",
        *,
        tls: bool = False,
        tls_ca_file: str | None = None,
        command_timeout: float = COMMAND_TIMEOUT,
    ) -> RedisProjectionStore:
        """One Redis server, with ``password`` (``requirepass``) and TLS when asked:
        the server's certificate is verified against ``tls_ca_file`` (default: the
        system's CAs) and must name ``host``."""
        client = aioredis.Redis(
            host=host,
            port=port,
            password=password,
            socket_connect_timeout=5,
            socket_timeout=command_timeout,
            health_check_interval=30,
            **tls_options(tls, tls_ca_file),
        )
        return cls(client, prefix)

    @classmethod
    def connect_sentinel(
        cls,
        sentinels: Sequence[tuple[str, int]],
        master: str,
        password: str | None = None,
        prefix: str = "agentmesh:",
        *,
        sentinel_password: str | None = None,
        tls: bool = False,
        tls_ca_file: str | None = None,
    ) -> RedisProjectionStore:
        """The master Sentinel names ``master``, found anew whenever a connection is
        opened: after a failover the old connections fail (Sentinel closes the
        clients of a demoted master), the client retries, and the retry reaches the
        promoted replica. ``password`` is the data servers'; ``sentinel_password`` the
        Sentinels' own, when they have one. TLS applies to both."""
        secure = tls_options(tls, tls_ca_file)
        manager = Sentinel(  # type: ignore[no-untyped-call]
            list(sentinels),
            sentinel_kwargs={
                "password": sentinel_password,
                "socket_connect_timeout": 5,
                **secure,
            },
            password=password,
            socket_connect_timeout=5,
            socket_timeout=COMMAND_TIMEOUT,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=8),
            retry_on_error=[
                redis_errors.ConnectionError,
                redis_errors.TimeoutError,
                redis_errors.ReadOnlyError,
            ],
            **secure,
        )
        client = manager.master_for(master)
        return cls(client, prefix, also_close=manager.sentinels)

    async def _call(self, script: Any, args: list[Any]) -> Any:
        try:
            return await script(keys=[self._current_key], args=[self._prefix, *args])
        except ResponseError as exc:
            if "STALE" in str(exc):
                raise StaleWriteError(str(exc)) from exc
            raise ReadStoreError(f"redis: {exc}") from exc
        except (RedisError, OSError) as exc:
            raise ReadStoreError(f"redis unavailable: {exc}") from exc

    async def meta(self) -> Meta | None:
        raw = await self._call(self._meta_script, [])
        return None if not raw else Meta.from_dict(decode(raw))

    async def agent_docs(self, dids: Sequence[str]) -> list[bytes | None]:
        if len(dids) != 1:
            return await self._hmget("agents", dids)
        # One agent (a trust read, a sidecar's check): merged with the other single
        # reads started in the same turn of the event loop into one script call, so
        # 32 concurrent trust reads cost a few round trips instead of 32 (each
        # through redis-py's pool, retry and parser). Same script, same
        # generation for all of them; an error reaches every reader of the batch.
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes | None] = loop.create_future()
        self._waiting.append((dids[0], future))
        if len(self._waiting) == 1:
            loop.call_soon(self._flush_waiting)
        return [await future]

    def _flush_waiting(self) -> None:
        batch, self._waiting = self._waiting, []
        task = asyncio.ensure_future(self._read_batch(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _read_batch(self, batch: list[tuple[str, asyncio.Future[bytes | None]]]) -> None:
        dids = list(dict.fromkeys(did for did, _ in batch))
        try:
            values = await self._hmget("agents", dids)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        found = dict(zip(dids, values, strict=True))
        for did, future in batch:
            if not future.done():
                future.set_result(found[did])

    async def grant_docs(self, grant_ids: Sequence[str]) -> list[bytes | None]:
        return await self._hmget("grants", grant_ids)

    async def _hmget(self, kind: str, ids: Sequence[str]) -> list[bytes | None]:
        if not ids:
            return []
        values = await self._call(self._hmget_script, [kind, *ids])
        return list(values) if values else [None] * len(ids)

    async def agent_closure(self, did: str) -> Closure | None:
        found = await self._call(self._closure_script, [did])
        if not found:
            return None
        doc, grants, agents = found
        return Closure(bytes(doc), _by_id(grants), _by_id(agents))

    async def agent_page(self, after: str | None, limit: int) -> list[tuple[str, bytes]]:
        start = "-" if after is None else "(" + after
        # The page as three replies (DIDs, documents joined, their lengths), not two per
        # agent: redis-py's parser costs about as much per reply as a document's decode.
        found = await self._call(self._page_script, [start, limit])
        if not found or not found[0]:
            return []
        dids, joined, lengths = bytes(found[0]).decode().split(","), found[1], found[2]
        page, end = [], 0
        for did, length in zip(dids, bytes(lengths).split(b","), strict=True):
            begin, end = end, end + int(length)
            page.append((did, joined[begin:end]))
        return page

    async def _generation(self) -> str | None:
        try:
            value = await self._redis.get(self._current_key)
        except (RedisError, OSError) as exc:
            raise ReadStoreError(f"redis unavailable: {exc}") from exc
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def _scan(self, kind: str) -> AsyncIterator[bytes]:
        generation = await self._generation()
        if generation is None:
            return
        key = f"{self._prefix}g:{generation}:{kind}"
        # HSCAN in a script that joins a chunk's values into one reply (with their
        # lengths): the client parses three replies per chunk instead of one per
        # document, which at 100,000 agents was most of a full read's time.
        cursor: bytes | str = "0"
        try:
            while True:
                cursor, joined, lengths = await self._scan_script(keys=[key], args=[cursor, _CHUNK])
                start = 0
                for length in bytes(lengths).split(b",") if lengths else ():
                    end = start + int(length)
                    yield bytes(joined[start:end])
                    start = end
                if cursor in (b"0", "0"):
                    return
        except (RedisError, OSError) as exc:
            raise ReadStoreError(f"redis unavailable: {exc}") from exc

    def all_agent_docs(self) -> AsyncIterator[bytes]:
        return self._scan("agents")

    def all_grant_docs(self) -> AsyncIterator[bytes]:
        return self._scan("grants")

    async def _follow_master(self) -> None:
        """Behind Sentinel, ask which server is master before a write: a switched
        master (``SENTINEL FAILOVER`` while the old one still runs, which Sentinel
        demotes only seconds later) closes the idle connections to the old one, so
        the write goes to the new master instead of one about to drop it."""
        pool = self._redis.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            try:
                await pool.get_master_address()  # type: ignore[no-untyped-call]
            except (RedisError, OSError) as exc:
                raise ReadStoreError(f"redis sentinel unavailable: {exc}") from exc

    async def commit(
        self, batch: Batch, expected: tuple[str, int], change: Change | None = None
    ) -> None:
        await self._follow_master()
        args: list[Any] = [
            expected[0],
            str(expected[1]),
            str(batch.meta.position),
            encode(batch.meta.to_dict()),
            len(batch.agents),
        ]
        for did, doc in batch.agents.items():
            args += [did, doc]
        args.append(len(batch.grants))
        for gid, doc in batch.grants.items():
            args += [gid, doc]
        # The change is published by the same script: one round trip, and never a
        # change without its write (nor a write whose change is lost in between).
        args.append(b"" if change is None else change.encode())
        await self._call(self._commit_script, args)

    async def replace_all(self, batch: Batch) -> None:
        """Write a whole new generation, then swap it in atomically."""
        await self._follow_master()
        generation = batch.meta.generation or uuid.uuid4().hex
        base = f"{self._prefix}g:{generation}:"
        try:
            await self._fill(base, batch)
        except (RedisError, OSError) as exc:
            raise ReadStoreError(f"redis unavailable: {exc}") from exc
        await self._call(self._swap_script, [generation])

    async def _fill(self, base: str, batch: Batch) -> None:
        agents, grants = list(batch.agents.items()), list(batch.grants.items())
        async with self._redis.pipeline(transaction=False) as pipe:
            for start in range(0, len(agents), _CHUNK):
                chunk = dict(agents[start : start + _CHUNK])
                pipe.hset(base + "agents", mapping=chunk)  # type: ignore[arg-type]
                pipe.zadd(base + "index", dict.fromkeys(chunk, 0))
            for start in range(0, len(grants), _CHUNK):
                pipe.hset(base + "grants", mapping=dict(grants[start : start + _CHUNK]))
            pipe.hset(
                base + "meta",
                mapping={
                    "position": str(batch.meta.position),
                    "json": encode(batch.meta.to_dict()),
                },
            )
            for suffix in ("meta", "agents", "grants", "index"):
                pipe.expire(base + suffix, _PENDING_TTL)
            await pipe.execute()

    async def publish(self, change: Change) -> None:
        try:
            await self._redis.publish(self._prefix + "changes", change.encode())
        except (RedisError, OSError) as exc:
            raise ReadStoreError(f"redis unavailable: {exc}") from exc

    async def changes(self) -> AsyncGenerator[Change, None]:
        """Change notifications, from ``SUBSCRIBED`` when the server confirms the
        subscription. redis-py reconnects a broken subscription by itself (after a
        Sentinel failover, on the new master) and subscribes again; what was
        published in between is lost, so the confirmation of that one yields
        ``SUBSCRIBED`` too.

        A subscription only listens, so a server gone without a reset (a pod
        rescheduled elsewhere: its old address answers nothing) would leave it
        waiting forever while every change passes it by. After ``heartbeat`` seconds
        without a word it sends a PING; no answer within as long again raises
        ``ReadStoreError``, and the follower subscribes anew."""
        pubsub = self._redis.pubsub()
        loop = asyncio.get_running_loop()
        try:
            await pubsub.subscribe(self._prefix + "changes")
            heard, asked = loop.time(), False
            while True:
                message = await pubsub.get_message(timeout=self.heartbeat)
                if message is not None:
                    heard, asked = loop.time(), False
                    kind = message.get("type")
                    if kind == "message":
                        yield read_change(message["data"])
                    elif kind == "subscribe":
                        yield SUBSCRIBED
                elif loop.time() - heard >= self.heartbeat:
                    if asked:
                        raise ReadStoreError(
                            "redis: the change subscription went silent (no answer to PING)"
                        )
                    await pubsub.ping()
                    asked = True
        except (RedisError, OSError) as exc:
            raise ReadStoreError(f"redis unavailable: {exc}") from exc
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def flush_for_tests(self) -> None:
        """Delete every key under the prefix (what losing Redis's memory does)."""
        async for key in self._redis.scan_iter(match=self._prefix + "*"):
            await self._redis.delete(key)

    async def close(self) -> None:
        await self._redis.aclose(close_connection_pool=True)
        for other in self._also_close:
            await other.aclose(close_connection_pool=True)


def tls_options(tls: bool, ca_file: str | None) -> dict[str, Any]:
    """redis-py's keyword arguments for TLS that verifies the server."""
    if not tls:
        return {}
    return {"ssl": True, "ssl_cert_reqs": "required", "ssl_ca_certs": ca_file}


def _by_id(flat: Sequence[bytes]) -> dict[str, bytes]:
    """A script's [id, doc, id, doc, …] reply as {id: doc}."""
    return {bytes(flat[i]).decode(): bytes(flat[i + 1]) for i in range(0, len(flat), 2)}
