"""Database URLs: users write ``postgresql://…``; each driver wants its own form."""

from __future__ import annotations

_PREFIXES = ("postgresql+asyncpg://", "postgresql://", "postgres://")


def asyncpg_dsn(url: str) -> str:
    """The URL in the form asyncpg accepts (``postgresql://…``)."""
    for prefix in _PREFIXES:
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    raise ValueError("a database URL starts with postgresql://")


def sqlalchemy_url(url: str) -> str:
    """The URL in the form SQLAlchemy's asyncpg dialect accepts."""
    return "postgresql+asyncpg://" + asyncpg_dsn(url)[len("postgresql://") :]
