"""Ed25519 verification: what ``ledger.identity.VerifyKey`` accepts, against OpenSSL.

The attacker's case first: a public key of small order (a torsion point) makes a
signature that verifies for *every* message under a cofactorless check without
the small-order rule — OpenSSL (``cryptography``) accepts it; with such a key
anyone could sign as the agent, and the agent could disown what it signed.
Verification (libsodium, through PyNaCl) refuses such keys and such signatures,
and a key enters the ledger only through ``VerifyKey.from_pem``, which refuses it.
Honest signatures verify the same under both libraries (the differential test).
"""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.errors import SignatureError
from ledger.identity import NOT_A_GROUP_ELEMENT, SigningKey, VerifyKey, is_group_element
from ledger.signatures import check_key_entries, verify_signature_chunk
from tests.support import FORGERY, IDENTITY, SMALL_ORDER, pem_of

P256_PEM = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
)


def openssl_accepts(raw: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def test_the_small_order_forgery_that_openssl_accepts_is_refused() -> None:
    for message in (b"", b"any message at all", b'{"type":"policy.violation"}'):
        assert openssl_accepts(IDENTITY, FORGERY, message)  # the attack is real
        assert not VerifyKey.from_raw(IDENTITY).is_valid(FORGERY, message)
        with pytest.raises(SignatureError):
            VerifyKey.from_raw(IDENTITY).verify(FORGERY, message)
    assert verify_signature_chunk([(7, IDENTITY, FORGERY, b"m")]) == [7]


@pytest.mark.parametrize("raw", SMALL_ORDER, ids=lambda raw: raw.hex()[:8] + raw.hex()[-2:])
def test_a_small_order_or_non_canonical_key_never_enters(raw: bytes) -> None:
    pem = pem_of(raw)
    with pytest.raises(SignatureError, match="small order"):
        VerifyKey.from_pem(pem)
    assert not VerifyKey.from_raw(raw).is_valid(FORGERY, b"m")


def test_an_honest_key_enters() -> None:
    key = SigningKey.generate()
    assert VerifyKey.from_pem(pem_of(key.public.raw)).did == key.did
    assert is_group_element(key.public.raw)


@pytest.mark.parametrize("raw", SMALL_ORDER, ids=lambda raw: raw.hex()[:8] + raw.hex()[-2:])
def test_a_recorded_key_is_read_back_without_the_group_check_and_still_verifies_nothing(
    raw: bytes,
) -> None:
    # Keys the ledger recorded are read back by from_recorded_pem (no 85 µs check each):
    # one of small order that an older ledger took still verifies no forgery.
    assert not is_group_element(raw)
    recorded = VerifyKey.from_recorded_pem(pem_of(raw))
    assert recorded.raw == raw
    assert not recorded.is_valid(FORGERY, b"m")
    with pytest.raises(SignatureError, match="not an Ed25519 key"):
        VerifyKey.from_recorded_pem(P256_PEM)
    with pytest.raises(SignatureError, match="not a PEM"):
        VerifyKey.from_recorded_pem("-----BEGIN PUBLIC KEY-----\nnot a key\n")


def test_a_key_entry_fails_on_the_key_it_installs_or_on_its_signature() -> None:
    ledger, agent = SigningKey.generate(), SigningKey.generate()
    body = b'{"type":"agent.registered"}'
    signed = (1, ledger.public.raw, ledger.sign(body), body)
    assert check_key_entries([(signed, agent.public.raw)]) == {}
    assert check_key_entries([(signed, IDENTITY), ((2, *signed[1:]), SMALL_ORDER[3])]) == {
        1: f"invalid public key: {NOT_A_GROUP_ELEMENT}",
        2: f"invalid public key: {NOT_A_GROUP_ELEMENT}",
    }
    forged = (3, ledger.public.raw, bytes(64), body)
    assert check_key_entries([(forged, agent.public.raw)]) == {3: "signature does not verify"}
    assert check_key_entries([((4, IDENTITY, FORGERY, body), IDENTITY)]) == {
        4: f"invalid public key: {NOT_A_GROUP_ELEMENT}"
    }


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.integers(0, 511), st.integers(0, 2))
def test_both_libraries_agree_on_honest_signatures_and_on_damaged_ones(
    message: bytes, bit: int, damage: int
) -> None:
    """Differential: a signature by a generated key verifies under both; flipping any
    bit of the signature, or of the message, or using another key fails under both."""
    key, other = SigningKey.generate(), SigningKey.generate()
    signature = key.sign(message)
    assert key.public.is_valid(signature, message)
    assert openssl_accepts(key.public.raw, signature, message)
    flipped = bytearray(signature)
    flipped[bit // 8] ^= 1 << (bit % 8)
    cases = [
        (key.public, bytes(flipped), message),
        (key.public, signature, message + b"\x00"),
        (other.public, signature, message),
    ]
    public, damaged, text = cases[damage]
    assert not public.is_valid(damaged, text)
    assert not openssl_accepts(public.raw, damaged, text)
    jobs = [(1, key.public.raw, signature, message), (2, public.raw, damaged, text)]
    assert verify_signature_chunk(jobs) == [2]


@pytest.mark.parametrize("length", [0, 63, 65, 128])
def test_a_signature_of_the_wrong_length_is_refused(length: int) -> None:
    key = SigningKey.generate()
    signature = (key.sign(b"m") * 2)[:length]
    assert not key.public.is_valid(signature, b"m")
    assert verify_signature_chunk([(3, key.public.raw, signature, b"m")]) == [3]


def test_a_signature_with_s_not_reduced_is_refused() -> None:
    """S >= L (the group order) is malleability: both libraries refuse it."""
    key = SigningKey.generate()
    signature = key.sign(b"m")
    order = 2**252 + 27742317777372353535851937790883648493
    s = int.from_bytes(signature[32:], "little") + order
    malleated = signature[:32] + s.to_bytes(32, "little")
    assert not key.public.is_valid(malleated, b"m")
    assert not openssl_accepts(key.public.raw, malleated, b"m")
