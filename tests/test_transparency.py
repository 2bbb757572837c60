"""The ledger as a transparency log over real HTTP: C2SP checkpoints, RFC 9162 proofs.

A client that pinned the ledger's note key verifies what the API serves with
nothing but ``ledger.merkle`` and ``ledger.note`` (what any RFC 9162 / C2SP
implementation would do)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import pytest

from agentmesh.embedded import EmbeddedRedis
from ledger import merkle, tlog
from ledger.identity import SigningKey
from ledger.note import open_checkpoint, parse_vkey
from tests.api_support import Api, api_settings, running_api


@pytest.fixture
async def api(
    database_url: str, redis_server: EmbeddedRedis, ledger_key: SigningKey
) -> AsyncIterator[Api]:
    settings = api_settings(
        database_url, redis_server, ledger_key, AGENTMESH_LEDGER_CHECKPOINT_EVERY="5"
    )
    async with running_api(settings) as running:
        yield running


def b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


async def test_checkpoints_and_proofs_verify_with_the_pinned_key(
    api: Api, ledger_key: SigningKey
) -> None:
    pinned = tlog.verifier(ledger_key.public)
    served = (await api.client.get("/v1/ledger/vkey")).text.strip()
    assert parse_vkey(served).key_id == pinned.key_id
    for _ in range(3):
        await api.register()
    first_note = (await api.client.get("/v1/ledger/checkpoint")).text
    first, _ = open_checkpoint(first_note, [pinned])
    assert first.origin == f"agentmesh.ledger/{ledger_key.did}"
    for _ in range(18):
        await api.register()
    head = await api.head()
    second_note = (await api.client.get("/v1/ledger/checkpoint")).text
    second, _ = open_checkpoint(second_note, [pinned])
    assert 3 <= first.size < second.size <= head  # a checkpoint every 5 entries
    # Every entry of the second tree is in it; the first tree is a prefix of it.
    for position in range(1, second.size + 1):
        proof = (
            await api.client.get(
                "/v1/ledger/proofs/inclusion",
                params={"position": position, "tree_size": second.size},
            )
        ).json()
        assert proof["leaf_index"] == position - 1
        merkle.verify_inclusion(
            b64(proof["leaf_hash"]),
            position - 1,
            second.size,
            [b64(h) for h in proof["hashes"]],
            second.root_hash,
        )
    consistency = (
        await api.client.get(
            "/v1/ledger/proofs/consistency", params={"first": first.size, "second": second.size}
        )
    ).json()
    merkle.verify_consistency(
        first.size,
        second.size,
        [b64(h) for h in consistency["hashes"]],
        first.root_hash,
        second.root_hash,
    )


async def test_impossible_proof_requests_are_400(api: Api) -> None:
    await api.register()
    head = await api.head()
    for path, params in (
        ("/v1/ledger/proofs/inclusion", {"position": 1, "tree_size": head + 5}),
        ("/v1/ledger/proofs/inclusion", {"position": head + 1, "tree_size": head}),
        ("/v1/ledger/proofs/inclusion", {"position": 0, "tree_size": head}),
        ("/v1/ledger/proofs/consistency", {"first": head, "second": head + 1}),
        ("/v1/ledger/proofs/consistency", {"first": 2, "second": 1}),
        ("/v1/ledger/proofs/consistency", {"first": "x", "second": 1}),
    ):
        response = await api.client.get(path, params=params)
        assert response.status_code == 400, (path, params, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
