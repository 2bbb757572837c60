"""Ed25519 identities.

Private keys travel as PEM PKCS#8, public keys as PEM SubjectPublicKeyInfo.
A DID is ``did:mesh:`` + the first 32 hex characters of SHA-256 over the raw
32-byte public key, so anyone holding a key can check which DID it belongs to.

Private key material never leaves this module as text except through
``private_key_pem`` (used only by ``agentmesh identity generate``); ``repr`` of
a ``SigningKey`` never shows it, so a key cannot leak into a log line.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from nacl.bindings import crypto_core_ed25519_is_valid_point, crypto_sign_open
from nacl.exceptions import BadSignatureError

from ledger.errors import SignatureError

DID_PREFIX = "did:mesh:"
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
DID_PATTERN = re.compile(r"^did:mesh:[0-9a-f]{32}$")
NOT_A_GROUP_ELEMENT = (
    "public key is a point of small order or not canonically encoded: "
    "not a key anyone can hold alone"
)


def did_for_raw_public_key(raw: bytes) -> str:
    """The DID of a raw 32-byte Ed25519 public key."""
    return DID_PREFIX + hashlib.sha256(raw).hexdigest()[:32]


def is_did(value: str) -> bool:
    return bool(DID_PATTERN.match(value))


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """An Ed25519 public key with its DID."""

    raw: bytes
    _did: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Derived once: the write path asks for the ledger's DID per batch.
        object.__setattr__(self, "_did", did_for_raw_public_key(self.raw))

    @classmethod
    def from_raw(cls, raw: bytes) -> VerifyKey:
        # Only the bytes are kept: every check goes through ``is_signature``, and a
        # key read back from storage entered through ``from_pem``.
        if len(raw) != PUBLIC_KEY_BYTES:
            raise SignatureError("public key must be 32 raw Ed25519 bytes")
        return cls(raw=raw)

    @classmethod
    def from_pem(cls, pem: str | bytes) -> VerifyKey:
        """A public key entering the ledger (a registration, a rotation, a ledger key):
        parsed, and refused unless it is a point of the prime-order group, canonically
        encoded (``is_group_element``)."""
        key = cls.from_recorded_pem(pem)
        if not is_group_element(key.raw):
            # A torsion point (or a non-canonical encoding) verifies a forged signature
            # for every message under some verifiers: with it anyone could sign as the
            # agent, and the agent could disown what it signed.
            raise SignatureError(NOT_A_GROUP_ELEMENT)
        return key

    @classmethod
    def from_recorded_pem(cls, pem: str | bytes) -> VerifyKey:
        """A public key the ledger already recorded, read back (a stored registration or
        rotation): parsed, without repeating ``from_pem``'s group check, which costs
        ~85 µs a key (seconds over the tens of thousands of signers of a big export or
        a retention cut). A key of small order verifies nothing anyway: ``is_signature``
        refuses it. The audit bundle's verifier checks the group of every key a key
        entry installs, off its main thread (``ledger.signatures``)."""
        data = pem.encode() if isinstance(pem, str) else pem
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise SignatureError("public key is not a PEM SubjectPublicKeyInfo") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise SignatureError("public key is not an Ed25519 key")
        return cls(raw=key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    @property
    def did(self) -> str:
        return self._did

    def pem(self) -> str:
        return (
            Ed25519PublicKey.from_public_bytes(self.raw)
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def verify(self, signature: bytes, message: bytes) -> None:
        """Return None if ``signature`` is valid for ``message``; raise SignatureError."""
        if not self.is_valid(signature, message):
            raise SignatureError(f"signature does not verify for {self.did}")

    def is_valid(self, signature: bytes, message: bytes) -> bool:
        """Whether ``signature`` is this key's over ``message`` (``is_signature``)."""
        return is_signature(self.raw, signature, message)


def is_group_element(raw: bytes) -> bool:
    """Whether ``raw`` is the canonical encoding of a point of Ed25519's prime-order
    group (libsodium's ``crypto_core_ed25519_is_valid_point``): what every public key
    the ledger admits must be. ~85 µs: the point times the group's order."""
    return len(raw) == PUBLIC_KEY_BYTES and crypto_core_ed25519_is_valid_point(raw)


def is_signature(raw_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is the Ed25519 signature of ``raw_key`` over ``message``:
    libsodium's check (through PyNaCl), the one every verification in the ledger uses.
    Besides RFC 8032's equation and ``S < L`` it refuses a key or an ``R`` of small
    order and non-canonical encodings, which OpenSSL's check accepts (a key of small
    order verifies a forged signature for every message: ``tests/test_signatures.py``);
    and it takes about half OpenSSL's time (``bench/append.py`` prints both)."""
    if len(signature) != SIGNATURE_BYTES or len(raw_key) != PUBLIC_KEY_BYTES:
        return False
    try:
        crypto_sign_open(signature + message, raw_key)
    except BadSignatureError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class SigningKey:
    """An Ed25519 private key. Its repr never shows key material."""

    _key: Ed25519PrivateKey = field(repr=False)
    public: VerifyKey = field(repr=False)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls._wrap(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: str | bytes) -> SigningKey:
        data = pem.encode() if isinstance(pem, str) else pem
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            # The message never includes the input: it may be a private key.
            raise SignatureError("private key is not an unencrypted PEM PKCS#8 key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise SignatureError("private key is not an Ed25519 key")
        return cls._wrap(key)

    @classmethod
    def _wrap(cls, key: Ed25519PrivateKey) -> SigningKey:
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return cls(_key=key, public=VerifyKey.from_raw(raw))

    @property
    def did(self) -> str:
        return self.public.did

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def private_key_pem(self) -> str:
        """PEM PKCS#8 text of the private key: for `identity generate` only."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()

    def __repr__(self) -> str:
        return f"SigningKey(did={self.did!r})"


def b64encode(data: bytes) -> str:
    """Standard base64 with padding (RFC 4648 §4), the form used on the wire."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, what: str = "value") -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise SignatureError(f"{what} is not valid base64") from exc
