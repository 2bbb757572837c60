"""C2SP signed notes, transparency-log checkpoints and Ed25519 cosignatures.

* Signed note (c2sp.org/signed-note): a text ending in a newline, a blank
  line, then signature lines ``— <key name> <base64(key id ‖ signature)>``.
  Key id = SHA-256(name ‖ 0x0A ‖ type ‖ public key)[:4]; type 0x01 is an
  Ed25519 signature over the text.
* Checkpoint (c2sp.org/tlog-checkpoint): the note text is the origin line,
  the decimal tree size, the base64 root hash, then optional extension lines.
* Cosignature (c2sp.org/tlog-cosignature, ``cosignature/v1``): type 0x04, an
  Ed25519 signature over ``cosignature/v1\\ntime <T>\\n`` + checkpoint text,
  encoded as 8-byte big-endian T ‖ 64-byte signature.
* Verifier keys in Go's vkey form ``<name>+<hex key id>+<base64(type ‖ key)>``.

Parsing is strict: anything malformed raises NoteError naming what is wrong.
As the spec requires, a verifier ignores signatures by keys it does not know,
rejects a note whose known signature fails, and rejects a note that no known
key signed. Pure: no I/O and no clock (a cosigner is given its timestamp).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger.errors import NoteError, SignatureError
from ledger.identity import SigningKey, VerifyKey

ED25519 = 0x01
COSIGNATURE_V1 = 0x04
MAX_SIGNATURES = 100  # the spec requires accepting at least 16; Go's sumdb/note stops at 100
_SIG_PREFIX = "\u2014 "  # em dash, space
_COSIGNATURE_HEADER = b"cosignature/v1\n"
_COSIGNATURE_SIZE = 8 + 64
_MAX_TIMESTAMP = 2**63 - 1
_MAX_TREE_SIZE = 2**64 - 1
_DECIMAL = re.compile(r"(?:0|[1-9][0-9]*)\Z", re.ASCII)
_HEX8 = re.compile(r"[0-9a-fA-F]{8}\Z", re.ASCII)


# --- keys ---------------------------------------------------------------------


def key_id(name: str, sig_type: int, public_key: bytes) -> bytes:
    """The 4-byte key id: SHA-256(name ‖ 0x0A ‖ type ‖ public key)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + bytes((sig_type,)) + public_key).digest()[:4]


def is_valid_key_name(name: str) -> bool:
    """A key name is non-empty and holds no Unicode space and no ``+``."""
    return bool(name) and "+" not in name and not any(c.isspace() for c in name)


class NoteVerifier(Protocol):
    """Checks signatures by one key, identified by ``(name, key_id)``."""

    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> bytes: ...

    def verify(self, text: bytes, signature: bytes) -> bool: ...


class NoteSigner(Protocol):
    """Signs note texts with one key, identified by ``(name, key_id)``."""

    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> bytes: ...

    def sign(self, text: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Ed25519Verifier:
    """Verifies Ed25519 note signatures (type 0x01), such as a log's checkpoint signature."""

    name: str
    key: VerifyKey

    def __post_init__(self) -> None:
        _require_key_name(self.name)

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, ED25519, self.key.raw)

    def verify(self, text: bytes, signature: bytes) -> bool:
        return len(signature) == 64 and self.key.is_valid(signature, text)

    def vkey(self) -> str:
        """This key in Go's verifier-key text form."""
        return _format_vkey(self.name, ED25519, self.key.raw)


@dataclass(frozen=True, slots=True)
class CosignatureVerifier:
    """Verifies ``cosignature/v1`` witness cosignatures (type 0x04) of checkpoints."""

    name: str
    key: VerifyKey

    def __post_init__(self) -> None:
        _require_key_name(self.name)

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, COSIGNATURE_V1, self.key.raw)

    def verify(self, text: bytes, signature: bytes) -> bool:
        if len(signature) != _COSIGNATURE_SIZE:
            return False
        timestamp = int.from_bytes(signature[:8], "big")
        if timestamp > _MAX_TIMESTAMP:
            return False
        return self.key.is_valid(signature[8:], cosigned_message(text, timestamp))

    def vkey(self) -> str:
        """This key in Go's verifier-key text form (type byte 0x04)."""
        return _format_vkey(self.name, COSIGNATURE_V1, self.key.raw)


@dataclass(frozen=True, slots=True)
class Ed25519Signer:
    """Signs note texts with an Ed25519 key (type 0x01)."""

    name: str
    key: SigningKey

    def __post_init__(self) -> None:
        _require_key_name(self.name)

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, ED25519, self.key.public.raw)

    def sign(self, text: bytes) -> bytes:
        return self.key.sign(text)

    def verifier(self) -> Ed25519Verifier:
        return Ed25519Verifier(self.name, self.key.public)

    @classmethod
    def from_skey(cls, skey: str) -> Ed25519Signer:
        """Parse Go's signer-key form ``PRIVATE+KEY+<name>+<hex id>+<base64(0x01 ‖ seed)>``."""
        parts = skey.split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise NoteError("signer key does not start with PRIVATE+KEY+<name>+<id>+")
        name, id_hex, key64 = parts[2:]
        data = _decode_key_fields(name, id_hex, key64, "signer key")
        if data[0] != ED25519 or len(data) != 33:
            raise NoteError("signer key is not a 32-byte Ed25519 seed (type 0x01)")
        signer = cls(name, _signing_key_from_seed(data[1:]))
        if signer.key_id.hex() != id_hex.lower():
            raise NoteError("signer key id does not match its name and key")
        return signer


@dataclass(frozen=True, slots=True)
class CosignatureSigner:
    """Cosigns checkpoints as a witness (``cosignature/v1``) at a given POSIX time."""

    name: str
    key: SigningKey
    timestamp: int

    def __post_init__(self) -> None:
        _require_key_name(self.name)
        if not 0 <= self.timestamp <= _MAX_TIMESTAMP:
            raise NoteError(f"cosignature timestamp {self.timestamp} is outside 0..2**63-1")

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, COSIGNATURE_V1, self.key.public.raw)

    def sign(self, text: bytes) -> bytes:
        signature = self.key.sign(cosigned_message(text, self.timestamp))
        return self.timestamp.to_bytes(8, "big") + signature

    def verifier(self) -> CosignatureVerifier:
        return CosignatureVerifier(self.name, self.key.public)


def cosigned_message(text: bytes, timestamp: int) -> bytes:
    """What a ``cosignature/v1`` signs: the header, the time line, then the checkpoint text."""
    return _COSIGNATURE_HEADER + b"time %d\n" % timestamp + text


def cosignature_timestamp(signature: NoteSignature) -> int:
    """The POSIX time a ``cosignature/v1`` signature states it was made."""
    if len(signature.signature) != _COSIGNATURE_SIZE:
        raise NoteError(f"cosignature by {signature.name} is not 8 + 64 bytes")
    timestamp = int.from_bytes(signature.signature[:8], "big")
    if timestamp > _MAX_TIMESTAMP:
        raise NoteError(f"cosignature by {signature.name} has a timestamp above 2**63-1")
    return timestamp


def parse_vkey(vkey: str) -> Ed25519Verifier | CosignatureVerifier:
    """Parse ``<name>+<hex key id>+<base64(type ‖ key)>`` for type 0x01 or 0x04."""
    parts = vkey.split("+", 2)
    if len(parts) != 3:
        raise NoteError("verifier key is not <name>+<key id>+<base64 key>")
    name, id_hex, key64 = parts
    data = _decode_key_fields(name, id_hex, key64, "verifier key")
    if key_id(name, data[0], data[1:]).hex() != id_hex.lower():
        raise NoteError("verifier key id does not match its name and key")
    if data[0] not in (ED25519, COSIGNATURE_V1):
        raise NoteError(f"verifier key has unsupported signature type 0x{data[0]:02x}")
    try:
        key = VerifyKey.from_raw(data[1:])
    except SignatureError as exc:
        raise NoteError("verifier key is not a 32-byte Ed25519 public key") from exc
    if data[0] == ED25519:
        return Ed25519Verifier(name, key)
    return CosignatureVerifier(name, key)


def _decode_key_fields(name: str, id_hex: str, key64: str, what: str) -> bytes:
    if not is_valid_key_name(name):
        raise NoteError(f"{what} name {name!r} is empty or holds a space or '+'")
    if not _HEX8.match(id_hex):
        raise NoteError(f"{what} id {id_hex!r} is not 8 hexadecimal digits")
    data = _strict_b64(key64, f"{what} material")
    if not data:
        raise NoteError(f"{what} material is empty")
    return data


def _format_vkey(name: str, sig_type: int, public_key: bytes) -> str:
    encoded = base64.b64encode(bytes((sig_type,)) + public_key).decode()
    return f"{name}+{key_id(name, sig_type, public_key).hex()}+{encoded}"


def _signing_key_from_seed(seed: bytes) -> SigningKey:
    # identity.SigningKey loads PKCS#8 only; a seed round-trips through it
    # rather than reaching into its private constructor.
    pem = Ed25519PrivateKey.from_private_bytes(seed).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return SigningKey.from_pem(pem)


def _require_key_name(name: str) -> None:
    if not is_valid_key_name(name):
        raise NoteError(f"key name {name!r} is empty or holds a space or '+'")


# --- notes ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NoteSignature:
    """One signature line: key name, 4-byte key id, signature bytes after the id."""

    name: str
    key_id: bytes
    signature: bytes

    def line(self) -> str:
        """The signature line, with its final newline."""
        encoded = base64.b64encode(self.key_id + self.signature).decode()
        return f"{_SIG_PREFIX}{self.name} {encoded}\n"


@dataclass(frozen=True, slots=True)
class Note:
    """A note text and its signatures, verified or not."""

    text: str
    signatures: tuple[NoteSignature, ...] = ()

    def __post_init__(self) -> None:
        _check_text(self.text)

    def encode(self) -> str:
        """The signed-note form: text, blank line, signature lines."""
        if not self.signatures:
            raise NoteError("a signed note needs at least one signature")
        return self.text + "\n" + "".join(s.line() for s in self.signatures)

    def signed(self, *signers: NoteSigner) -> Note:
        """This note with a signature by each signer added, replacing their earlier ones."""
        text = self.text.encode()
        fresh = [NoteSignature(s.name, s.key_id, s.sign(text)) for s in signers]
        replaced = {(s.name, s.key_id) for s in fresh}
        kept = [s for s in self.signatures if (s.name, s.key_id) not in replaced]
        return Note(self.text, (*kept, *fresh))


@dataclass(frozen=True, slots=True)
class VerifiedNote:
    """A note whose known signatures all verified; ``unverified`` are by unknown keys."""

    text: str
    verified: tuple[NoteSignature, ...]
    unverified: tuple[NoteSignature, ...]


def sign_note(text: str, *signers: NoteSigner) -> str:
    """Sign ``text`` (ending in a newline) with each signer; return the signed note."""
    if not signers:
        raise NoteError("signing a note needs at least one signer")
    return Note(text).signed(*signers).encode()


def parse_note(data: str | bytes) -> Note:
    """Parse a signed note's syntax (no verification); raise NoteError if malformed."""
    message = _decode_utf8(data)
    _check_characters(message)
    # The text ends at the last blank line: texts may hold blank lines, signatures may not.
    split = message.rfind("\n\n")
    if split < 0:
        raise NoteError("note has no blank line before its signatures")
    text, block = message[: split + 1], message[split + 2 :]
    if not block.endswith("\n"):
        raise NoteError("note's signature block is empty or does not end with a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"note has more than {MAX_SIGNATURES} signatures")
    return Note(text, tuple(_parse_signature_line(n, line) for n, line in enumerate(lines, 1)))


def open_note(data: str | bytes, verifiers: Iterable[NoteVerifier]) -> VerifiedNote:
    """Parse and verify a signed note against known keys; raise NoteError unless trusted.

    Signatures by unknown keys are ignored (spec: MUST); a known key whose
    signature fails rejects the whole note (spec: SHOULD); at least one known
    key must have signed (spec: MUST).
    """
    note = parse_note(data)
    known = _index_verifiers(verifiers)
    text = note.text.encode()
    verified: dict[tuple[str, bytes], NoteSignature] = {}
    unverified: list[NoteSignature] = []
    for sig in note.signatures:
        verifier = known.get((sig.name, sig.key_id))
        if verifier is None:
            unverified.append(sig)
        elif not verifier.verify(text, sig.signature):
            raise NoteError(f"signature by {sig.name}+{sig.key_id.hex()} does not verify")
        else:
            verified.setdefault((sig.name, sig.key_id), sig)
    if not verified:
        seen = ", ".join(f"{s.name}+{s.key_id.hex()}" for s in unverified)
        raise NoteError(f"note has no signature by a known key (signed by: {seen})")
    return VerifiedNote(note.text, tuple(verified.values()), tuple(unverified))


def _index_verifiers(verifiers: Iterable[NoteVerifier]) -> dict[tuple[str, bytes], NoteVerifier]:
    known: dict[tuple[str, bytes], NoteVerifier] = {}
    for verifier in verifiers:
        ident = (verifier.name, verifier.key_id)
        # Two keys answering to one (name, id) would make "which key signed" ambiguous.
        if ident in known:
            raise NoteError(f"two verifier keys share {ident[0]}+{ident[1].hex()}")
        known[ident] = verifier
    return known


def _parse_signature_line(number: int, line: str) -> NoteSignature:
    if not line.startswith(_SIG_PREFIX):
        raise NoteError(f"signature line {number} does not start with an em dash and a space")
    name, _, encoded = line[len(_SIG_PREFIX) :].partition(" ")
    if not is_valid_key_name(name):
        raise NoteError(f"signature line {number}: key name {name!r} is not valid")
    raw = _strict_b64(encoded, f"signature line {number}")
    if len(raw) < 5:
        raise NoteError(f"signature line {number}: shorter than a key id and a signature")
    return NoteSignature(name, raw[:4], raw[4:])


def _decode_utf8(data: str | bytes) -> str:
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NoteError(f"note is not valid UTF-8 at byte {exc.start}") from exc


def _check_characters(text: str) -> None:
    for offset, char in enumerate(text):
        if char < " " and char != "\n":
            raise NoteError(f"note holds control character U+{ord(char):04X} at {offset}")
        if "\ud800" <= char <= "\udfff":
            raise NoteError(f"note holds a lone surrogate at {offset}")


def _check_text(text: str) -> None:
    _check_characters(text)
    if not text.endswith("\n"):
        raise NoteError("note text must end with a newline")


def _strict_b64(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise NoteError(f"{what} is not valid base64") from exc
    # Only the canonical encoding is accepted, so one value has one spelling.
    if base64.b64encode(raw).decode() != text:
        raise NoteError(f"{what} is not canonical base64")
    return raw


# --- checkpoints -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A tlog-checkpoint note text: origin, tree size, root hash, extension lines."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require_line(self.origin, "checkpoint origin")
        if not 0 <= self.size <= _MAX_TREE_SIZE:
            raise NoteError(f"checkpoint tree size {self.size} is outside 0..2**64-1")
        if len(self.root_hash) != 32:
            raise NoteError(f"checkpoint root hash is {len(self.root_hash)} bytes, not 32")
        for line in self.extensions:
            _require_line(line, "checkpoint extension line")

    def body(self) -> str:
        """The note text: one line each for origin, size, root, extensions."""
        root = base64.b64encode(self.root_hash).decode()
        return "".join(
            f"{line}\n" for line in (self.origin, str(self.size), root, *self.extensions)
        )

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Parse a checkpoint note text strictly; raise NoteError naming what is wrong."""
        _check_text(text)
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise NoteError("checkpoint needs origin, tree size and root hash lines")
        origin, size, root, *extensions = lines
        if not _DECIMAL.match(size):
            raise NoteError(f"checkpoint tree size {size!r} is not a decimal without leading zeros")
        root_hash = _strict_b64(root, "checkpoint root hash")
        return cls(origin, int(size), root_hash, tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, *signers: NoteSigner) -> str:
    """The checkpoint as a signed note."""
    return sign_note(checkpoint.body(), *signers)


def open_checkpoint(
    data: str | bytes, verifiers: Iterable[NoteVerifier]
) -> tuple[Checkpoint, VerifiedNote]:
    """Verify a signed checkpoint against known keys (pass the log's key) and parse it."""
    note = open_note(data, verifiers)
    return Checkpoint.parse(note.text), note


def _require_line(value: str, what: str) -> None:
    if not value:
        raise NoteError(f"{what} is empty")
    if "\n" in value:
        raise NoteError(f"{what} holds a newline")
    _check_characters(value)
