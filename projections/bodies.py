"""Stored event bodies decoded into what the fold reads, and nothing more.

``ledger.events.decode_body`` builds the full event struct and checks every
field against its pattern (DIDs, times, event ids, names): right at the edge,
where bodies arrive, and wasted on a body the ledger has already accepted.
Rebuilding the projections decodes every stored body once more, and 99 % of a
ledger is reports and handshakes, so for those four types this module decodes
straight into small structs of the fields the fold reads (msgspec skips the
rest without building it). Every other type — registrations, suspensions,
grants, the ledger's own events — is rare and goes through ``decode_body``, so
the fold sees the real struct there, and a body no lean struct accepts is
refused exactly as ``decode_body`` refuses it.

The lean structs carry the same attribute names as the events they stand for,
so the fold's handlers take either (``projections.state``).
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from ledger.events import AnyEvent, decode_body

__all__ = [
    "FailedHandshakeBody",
    "FoldEvent",
    "HandshakeBody",
    "ReportBody",
    "SignalBody",
    "decode_for_fold",
]


class ReportBody(msgspec.Struct, frozen=True, gc=False, tag_field="type", tag="policy.violation"):
    """What the fold reads of a ``policy.violation``."""

    actor: str
    agent: str
    severity: str
    repeat_of: str | None = None


class SignalBody(msgspec.Struct, frozen=True, gc=False, tag_field="type", tag="trust.signal"):
    """What the fold reads of a ``trust.signal``."""

    actor: str
    agent: str


class HandshakeBody(
    msgspec.Struct, frozen=True, gc=False, tag_field="type", tag="handshake.completed"
):
    """What the fold reads of a ``handshake.completed``."""

    initiator: str
    responder: str


class FailedHandshakeBody(
    msgspec.Struct, frozen=True, gc=False, tag_field="type", tag="handshake.failed"
):
    """What the fold reads of a ``handshake.failed``."""

    initiator: str
    responder: str


_RARE_TAGS = (
    "agent.registered",
    "agent.key_rotated",
    "agent.suspended",
    "agent.reinstated",
    "delegation.granted",
    "delegation.revoked",
    "ledger.retention_applied",
    "ledger.key_rotated",
)
# One field-less struct per rare tag (a tagged union needs a class per tag): it says
# only "decode this one in full".
_RARE = tuple(
    msgspec.defstruct(f"Rare_{i}", [], frozen=True, gc=False, tag_field="type", tag=tag)
    for i, tag in enumerate(_RARE_TAGS)
)
_LEAN = (ReportBody, SignalBody, HandshakeBody, FailedHandshakeBody)
_LEAN_TYPES = frozenset(_LEAN)
_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(
    Union[(*_LEAN, *_RARE)]  # built from a tuple: the rare classes are made above
)

FoldEvent = AnyEvent | ReportBody | SignalBody | HandshakeBody | FailedHandshakeBody
"""What the fold applies: a full event struct or one of the lean ones."""


def decode_for_fold(body: bytes) -> FoldEvent:
    """The fold's view of a stored body: a lean struct for a report, signal or
    handshake, else the full event (``decode_body``, which also raises
    ``EventValidationError`` for a body nothing here accepts)."""
    try:
        event = _decoder.decode(body)
    except msgspec.DecodeError:
        return decode_body(body)
    if type(event) in _LEAN_TYPES:
        return event  # type: ignore[no-any-return]
    return decode_body(body)
