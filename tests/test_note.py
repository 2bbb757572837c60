"""C2SP signed notes, checkpoints and cosignatures: Go sumdb/note and C2SP vectors, strictness."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.errors import NoteError, SignatureError
from ledger.identity import SigningKey
from ledger.merkle import leaf_hash
from ledger.note import (
    COSIGNATURE_V1,
    ED25519,
    Checkpoint,
    CosignatureSigner,
    CosignatureVerifier,
    Ed25519Signer,
    Ed25519Verifier,
    Note,
    NoteSignature,
    cosignature_timestamp,
    cosigned_message,
    key_id,
    open_checkpoint,
    open_note,
    parse_note,
    parse_vkey,
    sign_checkpoint,
    sign_note,
)
from tests.vectors import published_vectors

NOTES: dict[str, Any] = published_vectors()["signed_notes"]
ROOT = leaf_hash(b"root")


def log_signer(name: str = "example.com/log") -> Ed25519Signer:
    return Ed25519Signer(name, SigningKey.generate())


# --- published vectors ------------------------------------------------------------


@pytest.mark.parametrize("case", NOTES["verify"], ids=lambda c: c["desc"])
def test_go_and_c2sp_verify_vectors(case: dict[str, Any]) -> None:
    verifier = parse_vkey(case["vkey"])
    if case["valid"]:
        assert open_note(case["note"], [verifier]).text == case["want_text"]
    else:
        with pytest.raises(NoteError):
            open_note(case["note"], [verifier])


@pytest.mark.parametrize("case", NOTES["sign"], ids=lambda c: c["desc"])
def test_go_sign_vector_is_reproduced_byte_for_byte(case: dict[str, str]) -> None:
    signer = Ed25519Signer.from_skey(case["skey"])
    assert sign_note(case["text"], signer) == case["want_note"]


def test_signer_key_derives_the_published_verifier_key() -> None:
    signer = Ed25519Signer.from_skey(NOTES["sign"][0]["skey"])
    published = next(c["vkey"] for c in NOTES["verify"] if "PeterNeumann" in c["vkey"])
    assert signer.verifier().vkey() == published


@pytest.mark.parametrize("case", NOTES["malformed"], ids=lambda c: c["desc"])
def test_go_malformed_notes_are_rejected(case: dict[str, str]) -> None:
    with pytest.raises(NoteError):
        parse_note(case["note"])


@pytest.mark.parametrize("case", NOTES["parse_only"], ids=lambda c: c["desc"])
def test_c2sp_examples_parse(case: dict[str, Any]) -> None:
    note = parse_note(case["note"])
    assert [s.name for s in note.signatures] == case["want_names"]
    assert note.encode() == case["note"]
    if "checkpoint" in case:
        want = case["checkpoint"]
        checkpoint = Checkpoint.parse(note.text)
        assert (checkpoint.origin, checkpoint.size) == (want["origin"], want["size"])
        assert checkpoint.root_hash == base64.b64decode(want["root_b64"])
    if "cosignature" in case:
        cosig = next(s for s in note.signatures if s.name == case["cosignature"]["name"])
        assert cosignature_timestamp(cosig) == case["cosignature"]["timestamp"]


@pytest.mark.parametrize("case", NOTES["checkpoint_body"], ids=lambda c: c["desc"])
def test_go_checkpoint_body(case: dict[str, Any]) -> None:
    checkpoint = Checkpoint(case["origin"], case["size"], leaf_hash(b"hello world"))
    assert checkpoint.body() == case["body"]
    assert Checkpoint.parse(case["body"]) == checkpoint


def test_cosigned_message_matches_the_spec_example() -> None:
    body = b"example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    assert cosigned_message(body, 1679315147) == b"cosignature/v1\ntime 1679315147\n" + body


# --- signing, cosigning and verifying ------------------------------------------------


def test_checkpoint_round_trip_with_witness_cosignature() -> None:
    log = log_signer()
    witness = CosignatureSigner("witness.example/w1", SigningKey.generate(), 1679315147)
    checkpoint = Checkpoint("example.com/log", 42, ROOT, ("ext line",))
    cosigned = parse_note(sign_checkpoint(checkpoint, log)).signed(witness).encode()

    opened, note = open_checkpoint(cosigned, [log.verifier(), witness.verifier()])
    assert opened == checkpoint
    assert [s.name for s in note.verified] == ["example.com/log", "witness.example/w1"]
    assert cosignature_timestamp(note.verified[1]) == 1679315147
    # The cosignature signs the spec's message, not the bare text.
    raw = note.verified[1].signature
    assert witness.key.public.is_valid(
        raw[8:], cosigned_message(checkpoint.body().encode(), 1679315147)
    )


def test_cosignature_and_note_key_ids_are_domain_separated() -> None:
    key = SigningKey.generate()
    assert Ed25519Signer("w", key).key_id != CosignatureSigner("w", key, 0).key_id
    assert CosignatureSigner("w", key, 0).key_id == key_id("w", COSIGNATURE_V1, key.public.raw)
    assert Ed25519Signer("w", key).key_id == key_id("w", ED25519, key.public.raw)


def test_vkeys_round_trip_for_both_types() -> None:
    key = SigningKey.generate()
    note_verifier = Ed25519Verifier("example.com/log", key.public)
    cosig_verifier = CosignatureVerifier("witness.example/w1", key.public)
    assert parse_vkey(note_verifier.vkey()) == note_verifier
    assert parse_vkey(cosig_verifier.vkey()) == cosig_verifier


def test_unknown_signatures_are_ignored_but_reported() -> None:
    log, other = log_signer(), log_signer("other.example/log")
    note = open_note(sign_note("hello\n", other, log), [log.verifier()])
    assert [s.name for s in note.verified] == ["example.com/log"]
    assert [s.name for s in note.unverified] == ["other.example/log"]


def test_a_fresh_key_under_the_same_name_is_not_the_log() -> None:
    log, impostor = log_signer(), log_signer()
    forged = sign_checkpoint(Checkpoint("example.com/log", 1, ROOT), impostor)
    with pytest.raises(NoteError, match="no signature by a known key"):
        open_checkpoint(forged, [log.verifier()])


def test_a_failing_known_signature_rejects_the_note_even_beside_a_good_one() -> None:
    log, witness = log_signer(), CosignatureSigner("w.example", SigningKey.generate(), 5)
    note = parse_note(sign_note("a\n", log)).signed(witness)
    bad = note.signatures[1]
    forged = Note(note.text, (note.signatures[0], NoteSignature(bad.name, bad.key_id, bytes(72))))
    with pytest.raises(NoteError, match=r"w\.example\+\w+ does not verify"):
        open_note(forged.encode(), [log.verifier(), witness.verifier()])


def test_a_cosignature_with_another_timestamp_does_not_verify() -> None:
    witness = CosignatureSigner("w.example", SigningKey.generate(), 100)
    note = parse_note(sign_note("a\n", witness))
    sig = note.signatures[0]
    moved = NoteSignature(sig.name, sig.key_id, (101).to_bytes(8, "big") + sig.signature[8:])
    with pytest.raises(NoteError, match="does not verify"):
        open_note(Note(note.text, (moved,)).encode(), [witness.verifier()])


def test_resigning_replaces_a_signers_earlier_signature() -> None:
    log = log_signer()
    note = Note("a\n").signed(log).signed(log)
    assert len(note.signatures) == 1


def test_ambiguous_verifier_lists_are_refused() -> None:
    verifier = log_signer().verifier()
    with pytest.raises(NoteError, match="share"):
        open_note(sign_note("a\n", log_signer()), [verifier, verifier])


def test_note_error_is_a_signature_error() -> None:
    assert issubclass(NoteError, SignatureError)


@settings(max_examples=50, deadline=None)
@given(
    origin=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x2FF), min_size=1, max_size=30),
    size=st.integers(0, 2**64 - 1),
    root=st.binary(min_size=32, max_size=32),
    data=st.data(),
)
def test_signed_checkpoints_verify_and_any_changed_byte_fails(
    origin: str, size: int, root: bytes, data: st.DataObject
) -> None:
    log = log_signer()
    checkpoint = Checkpoint(origin, size, root)
    signed = sign_checkpoint(checkpoint, log).encode()
    assert open_checkpoint(signed, [log.verifier()])[0] == checkpoint

    at = data.draw(st.integers(0, len(signed) - 1))
    tampered = bytearray(signed)
    tampered[at] ^= 1 << data.draw(st.integers(0, 7))
    # A flip anywhere is caught: in the text by the signature, in the key name
    # or id by "no known key", elsewhere by strict parsing.
    with pytest.raises(NoteError):
        open_checkpoint(bytes(tampered), [log.verifier()])


# --- strict parsing ------------------------------------------------------------------

BAD_CHECKPOINTS = {
    "two lines": "origin\n5\n",
    "no final newline": f"origin\n5\n{base64.b64encode(ROOT).decode()}",
    "empty origin": f"\n5\n{base64.b64encode(ROOT).decode()}\n",
    "leading zero": f"origin\n05\n{base64.b64encode(ROOT).decode()}\n",
    "plus sign": f"origin\n+5\n{base64.b64encode(ROOT).decode()}\n",
    "space in size": f"origin\n 5\n{base64.b64encode(ROOT).decode()}\n",
    "underscore in size": f"origin\n1_000\n{base64.b64encode(ROOT).decode()}\n",
    "non-ASCII digit": f"origin\n\u0663\n{base64.b64encode(ROOT).decode()}\n",
    "size above 2**64-1": f"origin\n{2**64}\n{base64.b64encode(ROOT).decode()}\n",
    "root not base64": "origin\n5\nnot base64!\n",
    "root 31 bytes": f"origin\n5\n{base64.b64encode(ROOT[:31]).decode()}\n",
    "root without padding": f"origin\n5\n{base64.b64encode(ROOT).decode().rstrip('=')}\n",
    "root non-canonical": "origin\n5\n" + base64.b64encode(ROOT).decode()[:42] + "x=\n",
    "empty extension line": f"origin\n5\n{base64.b64encode(ROOT).decode()}\n\next\n",
    "tab in origin": f"ori\tgin\n5\n{base64.b64encode(ROOT).decode()}\n",
}


@pytest.mark.parametrize("text", BAD_CHECKPOINTS.values(), ids=BAD_CHECKPOINTS.keys())
def test_malformed_checkpoint_texts_are_rejected(text: str) -> None:
    with pytest.raises(NoteError):
        Checkpoint.parse(text)


BAD_NOTES = {
    "invalid UTF-8": b"hello\xff\n\n\xe2\x80\x94 a AAAAAAA=\n",
    "carriage return": "hello\r\n\n\u2014 a AAAAAAA=\n",
    "hyphen instead of em dash": "hello\n\n- a AAAAAAA=\n",
    "name with plus": "hello\n\n\u2014 a+b AAAAAAA=\n",
    "missing signature": "hello\n\n\u2014 a \n",
    "signature of four bytes": "hello\n\n\u2014 a AAAAAA==\n",
    "two spaces": "hello\n\n\u2014 a  AAAAAAA=\n",
    "trailing blank line": "hello\n\n\u2014 a AAAAAAA=\n\n",
    "too many signatures": "hello\n\n" + "\u2014 a AAAAAAA=\n" * 101,
}


@pytest.mark.parametrize("data", BAD_NOTES.values(), ids=BAD_NOTES.keys())
def test_malformed_notes_are_rejected(data: str | bytes) -> None:
    with pytest.raises(NoteError):
        parse_note(data)


def vkey_with_valid_id(name: str, material: bytes) -> str:
    """A vkey whose id matches, so a later check is the one that fails."""
    ident = key_id(name, material[0], material[1:]).hex()
    return f"{name}+{ident}+{base64.b64encode(material).decode()}"


BAD_VKEYS = {
    "two parts": ("name+01234567", "not <name>"),
    "short id": ("name+0123456+AQ==", "not 8 hexadecimal"),
    "bad name": ("na me+01234567+AQ==", "name"),
    "non-canonical key": ("x+01234567+AR==", "canonical"),
    "wrong id": (
        "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "does not match",
    ),
    "unknown type": (vkey_with_valid_id("x", bytes((0x02,)) + bytes(32)), "type 0x02"),
    "short key": (vkey_with_valid_id("x", bytes((ED25519,)) + bytes(31)), "32-byte"),
}


@pytest.mark.parametrize(("vkey", "reason"), BAD_VKEYS.values(), ids=BAD_VKEYS.keys())
def test_malformed_vkeys_are_rejected(vkey: str, reason: str) -> None:
    with pytest.raises(NoteError, match=reason):
        parse_vkey(vkey)


def test_signers_refuse_what_cannot_be_encoded() -> None:
    with pytest.raises(NoteError, match="end with a newline"):
        sign_note("no newline", log_signer())
    with pytest.raises(NoteError, match="key name"):
        Ed25519Signer("two words", SigningKey.generate())
    with pytest.raises(NoteError, match="timestamp"):
        CosignatureSigner("w", SigningKey.generate(), -1)
    with pytest.raises(NoteError, match="PRIVATE"):
        Ed25519Signer.from_skey(
            "PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
        )
