"""Golden audit bundles (``tests/assets/audit``), as sigstore-python keeps good and bad
inputs: the good one verifies in both flavours, each tampered one fails at the line
and for the reason expected, and the script still writes the same bytes (so the
bundle format has not drifted)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from ledger.audit import BundleVerificationError, verify_bundle
from ledger.audit.bundle import Manifest
from ledger.identity import SigningKey, b64encode
from tests.assets.audit.make_assets import LEDGER_KEY, build

ASSETS = Path(__file__).parent / "assets" / "audit"


@pytest.mark.parametrize("name", ["good.jsonl", "good.cloudevents.jsonl"])
def test_the_good_bundle_verifies(name: str) -> None:
    report = verify_bundle(ASSETS / name, workers=0, ledger_key=LEDGER_KEY.public)
    assert (report.events, report.stubs, report.keys, report.signatures) == (3, 0, 2, 3)
    assert (report.manifest.first_position, report.manifest.last_position) == (3, 5)
    assert report.ledger_did == LEDGER_KEY.did
    assert (report.tree_size, report.proofs) == (5, 3)


def test_the_good_bundle_names_another_ledger_key_than_a_pinned_stranger() -> None:
    with pytest.raises(BundleVerificationError, match="ledger key mismatch") as caught:
        verify_bundle(ASSETS / "good.jsonl", workers=0, ledger_key=SigningKey.generate().public)
    assert caught.value.line == 1


@pytest.mark.parametrize(
    ("name", "line", "position", "reason"),
    [
        ("edited-body.jsonl", 7, 5, "entry_hash does not match the entry's content"),
        ("dropped-line.jsonl", 6, 4, "missing or out of order: expected position 4, found 5"),
        ("resigned-manifest.jsonl", 9, 0, "manifest signature is invalid"),
        (
            "altered-edge.jsonl",
            8,
            5,
            "the Merkle root of the bundle's entries differs from the signed tree head",
        ),
        (
            "tampered-proof.jsonl",
            5,
            3,
            "the inclusion proof does not lead to the signed tree head's root",
        ),
        ("dropped-proof.jsonl", 6, 4, "no inclusion proof"),
        (
            "edited-key-time.jsonl",
            9,
            0,
            "the key entries are not the ones the manifest signs (keys_digest differs): "
            "a key line was edited",
        ),
        (
            "swapped-proof.jsonl",
            5,
            3,
            "the inclusion proof does not lead to the signed tree head's root",
        ),
    ],
)
def test_a_tampered_bundle_fails_where_and_why_expected(
    name: str, line: int, position: int, reason: str
) -> None:
    with pytest.raises(BundleVerificationError) as caught:
        verify_bundle(ASSETS / name, workers=0)
    assert (caught.value.line, caught.value.position, caught.value.reason) == (
        line,
        position,
        reason,
    )


def test_the_assets_are_what_the_script_writes() -> None:
    for name, text in build().items():
        assert (ASSETS / name).read_text(encoding="utf-8") == text, f"{name} differs"


def _as_version_2(lines: list[str]) -> list[str]:
    """The same bundle as format version 2: no ``keys_digest``, the manifest re-signed."""
    manifest = msgspec.json.decode(lines[-1], type=Manifest)
    unsigned = msgspec.structs.replace(
        manifest, format_version=2, signature="", keys_digest=None, generated_at=None
    )
    signed = msgspec.structs.replace(
        unsigned, signature=b64encode(LEDGER_KEY.sign(unsigned.signed_bytes()))
    )
    header = lines[0].replace('"format_version":3', '"format_version":2', 1)
    return [header, *lines[1:-1], msgspec.json.encode(signed).decode()]


def test_a_version_2_bundle_still_verifies_without_keys_digest(tmp_path: Path) -> None:
    """Bundles exported before ``keys_digest``: their manifests' signed bytes are what
    they were, so they still verify; and a version 3 manifest must carry the digest, a
    version 2 one must not (neither can be passed off as the other)."""
    good = (ASSETS / "good.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(good[-1])["keys_digest"]
    assert '"format_version":3' in good[0]
    path = tmp_path / "v2.jsonl"
    path.write_text("\n".join(_as_version_2(good)) + "\n", encoding="utf-8")
    report = verify_bundle(path, workers=0, ledger_key=LEDGER_KEY.public)
    assert (report.events, report.keys, report.manifest.keys_digest) == (3, 2, None)
    # What version 2 could not see: the same edited key entry verifies there.
    edited = (ASSETS / "edited-key-time.jsonl").read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(_as_version_2(edited)) + "\n", encoding="utf-8")
    assert verify_bundle(path, workers=0).events == 3
    # A version 3 header with a manifest that drops the digest (re-signed): refused.
    downgraded = _as_version_2(good)
    downgraded[0] = good[0]
    path.write_text("\n".join(downgraded) + "\n", encoding="utf-8")
    with pytest.raises(BundleVerificationError, match="the manifest's range differs"):
        verify_bundle(path, workers=0)
