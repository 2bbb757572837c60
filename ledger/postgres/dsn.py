"""Database URLs: users write ``postgresql://…``; each driver wants its own form.

A URL also says what sits between us and PostgreSQL, with a query parameter
of ours that no driver ever sees (it is removed before connecting):

* ``?pooler=transaction``: a pooler in transaction mode (PgBouncer's
  ``pool_mode = transaction``, and the like). Each transaction may run on
  another server connection, so asyncpg's cache of named prepared statements
  is turned off (``statement_cache_size=0``: a statement prepared on one
  server connection does not exist on the next), and nothing that lives in a
  session may be used through it: ``LISTEN`` and session advisory locks need
  a direct URL.
* ``?pooler=none`` or no parameter: a direct session (or a session pooler).

It is a property of the URL, not a global switch, because it describes the
endpoint: the ledger's URL may go through PgBouncer while the direct URL and a
read replica's URL do not, and every program that is handed a URL (API,
projector, retention, the CLI's commands) connects correctly without more
plumbing.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

Pooler = Literal["none", "transaction"]
POOLERS: tuple[Pooler, ...] = ("none", "transaction")
POOLER_PARAM = "pooler"

_PREFIXES = ("postgresql+asyncpg://", "postgresql://", "postgres://")


def _split(url: str) -> tuple[str, Pooler]:
    """``postgresql://…`` without our parameter, and the pooler it named."""
    for prefix in _PREFIXES:
        if url.startswith(prefix):
            url = "postgresql://" + url[len(prefix) :]
            break
    else:
        raise ValueError("a database URL starts with postgresql://")
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    named = [value for key, value in query if key == POOLER_PARAM]
    if not named:
        return url, "none"
    pooler = named[-1].strip().lower()
    if pooler not in POOLERS:
        raise ValueError(
            f"expected {POOLER_PARAM}=transaction or {POOLER_PARAM}=none in the URL's query"
        )
    rest = urlencode([(key, value) for key, value in query if key != POOLER_PARAM])
    return urlunsplit(parts._replace(query=rest)), pooler


def pooler_of(url: str) -> Pooler:
    """What the URL says sits in front of PostgreSQL (``none`` when it says nothing)."""
    return _split(url)[1]


def asyncpg_dsn(url: str) -> str:
    """The URL in the form asyncpg accepts (``postgresql://…``, our parameter removed)."""
    return _split(url)[0]


def connect_kwargs(url: str) -> dict[str, Any]:
    """Keyword arguments of ``asyncpg.connect``/``create_pool`` for this URL: the DSN,
    and no statement cache behind a transaction pooler."""
    dsn, pooler = _split(url)
    if pooler == "transaction":
        return {"dsn": dsn, "statement_cache_size": 0}
    return {"dsn": dsn}


def sqlalchemy_url(url: str) -> str:
    """The URL in the form SQLAlchemy's asyncpg dialect accepts.

    Migrations prepare named statements and take locks across statements:
    they need a direct URL, never one through a transaction pooler."""
    dsn, pooler = _split(url)
    if pooler == "transaction":
        raise ValueError(
            "migrations need a direct connection to PostgreSQL, not one through a "
            "transaction pooler (pooler=transaction): run them with the direct URL "
            "(the value of AGENTMESH_DATABASE_DIRECT_URL) as AGENTMESH_DATABASE_URL"
        )
    return "postgresql+asyncpg://" + dsn[len("postgresql://") :]
