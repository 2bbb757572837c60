"""``MemoryHandshakeStore``: challenges in this process, for unit tests. It passes the
handshake store's contract suite (``tests/test_handshake_store.py``) beside
``api.handshakes_postgres``."""

from __future__ import annotations

import dataclasses
from datetime import datetime

from api.handshakes import Challenge, new_challenge

__all__ = ["MemoryHandshakeStore"]


class MemoryHandshakeStore:
    """``api.handshakes.HandshakeStore`` in a dict (one process, nothing shared)."""

    def __init__(self) -> None:
        self._challenges: dict[str, Challenge] = {}

    async def create(
        self,
        initiator: str,
        responder: str,
        min_score: int | None,
        now: datetime,
        request_id: str | None = None,
    ) -> Challenge | None:
        challenge = new_challenge(initiator, responder, min_score, now, request_id)
        if challenge.handshake_id in self._challenges:
            return None
        self._challenges[challenge.handshake_id] = challenge
        return challenge

    async def get(self, handshake_id: str) -> Challenge | None:
        return self._challenges.get(handshake_id)

    async def consume(self, handshake_id: str, now: datetime) -> bool:
        challenge = self._challenges.get(handshake_id)
        if challenge is None or challenge.used_at is not None:
            return False
        self._challenges[handshake_id] = dataclasses.replace(challenge, used_at=now)
        return True
