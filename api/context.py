"""What every request handler gets: the clients, built once in the app's lifespan."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from api.errors import ProblemError
from api.handshakes import HandshakeStore
from ledger.ports import Ledger, LedgerReader
from projections.cache import CachedStore
from projections.config import TrustConfig
from projections.readstore import ProjectionReader

MAX_BODY_BYTES = 2 * 1024 * 1024  # a batch of 1,000 signed reports fits with room to spare


@dataclass
class ApiContext:
    """The API's dependencies (the composition root builds it)."""

    ledger: Ledger
    reader: ProjectionReader
    cache: CachedStore | None
    handshakes: HandshakeStore
    config: TrustConfig
    admin_token: str | None
    shadow_mode: bool
    clock: Callable[[], datetime]
    expected_revision: str
    background: list[asyncio.Task[None]] = field(default_factory=list)
    # Reads that may lag (event listings, ?at=): a read replica when one is configured.
    history: LedgerReader | None = None
    # One ``?at=`` fold at a time in this process (``api.routes._fold_slot``).
    folds: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))

    def now(self) -> datetime:
        return self.clock()

    @property
    def lagging_reads(self) -> LedgerReader:
        """Where reads that may lag behind the last append go (never appends, never
        a read of one's own write): the replica, else the ledger itself."""
        return self.history if self.history is not None else self.ledger

    def is_admin(self, authorization: str | None) -> bool:
        """Constant-time check of ``Authorization: Bearer <token>``."""
        if self.admin_token is None or authorization is None:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode(), self.admin_token.encode())

    def require_admin(self, authorization: str | None) -> None:
        if authorization is None:
            raise ProblemError(
                401,
                "unauthorized",
                "Unauthorized",
                "this call needs Authorization: Bearer <admin token>",
            )
        if not self.is_admin(authorization):
            raise ProblemError(403, "forbidden", "Forbidden", "the admin token is not valid")
