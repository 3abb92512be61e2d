"""Signatures that make round tasks capabilities: only the coordinator can issue one.

Each job has an Ed25519 key pair. The coordinator alone holds the private key
(in Redis under the job's ``signing_key``, which the identity issue's ACLs
close to everyone else); workers hold the public key, pinned in their own
configuration by its fingerprint or, unpinned, read from the job's signed
description. What is signed is a JSON document in canonical form: keys sorted,
no spaces, UTF-8, so that the verifier re-serialises the parsed message and
gets the same bytes (JSON numbers of ours are ints and Python floats, which
round-trip exactly).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class SignatureError(ValueError):
    """A signature, key or fingerprint that does not verify or cannot be read; one sentence."""


def canonical(document: dict[str, Any]) -> bytes:
    """The bytes a document is signed as."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


@dataclass(frozen=True)
class VerifyKey:
    """A job's public key: verifies what its coordinator signed."""

    raw: bytes

    @classmethod
    def from_text(cls, text: str) -> VerifyKey:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise SignatureError("the public key is not base64") from None
        if len(raw) != PUBLIC_KEY_BYTES:
            raise SignatureError(f"the public key has {len(raw)} bytes, not {PUBLIC_KEY_BYTES}")
        return cls(raw)

    def to_text(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    @property
    def fingerprint(self) -> str:
        """sha256 of the raw key, in hex: what operators compare and pin (``--coordinator-key``)."""
        return hashlib.sha256(self.raw).hexdigest()

    def verify(self, document: dict[str, Any], signature: str) -> None:
        """Return if ``signature`` is this key's over ``document``; raise :class:`SignatureError` otherwise."""
        try:
            raw_signature = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise SignatureError("the signature is not base64") from None
        if len(raw_signature) != SIGNATURE_BYTES:
            raise SignatureError("the signature has the wrong length")
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(raw_signature, canonical(document))
        except InvalidSignature:
            raise SignatureError(
                f"the signature does not verify with the coordinator key {self.fingerprint[:16]}…"
            ) from None
        except ValueError as error:  # a document that is not JSON-able (NaN, ...)
            raise SignatureError(f"the document cannot be verified: {error}") from None


@dataclass(frozen=True)
class SigningKey:
    """A job's private key: the coordinator's alone."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_bytes(cls, raw: bytes) -> SigningKey:
        try:
            return cls(Ed25519PrivateKey.from_private_bytes(raw))
        except ValueError:
            raise SignatureError("the stored signing key is not a 32-byte Ed25519 key") from None

    def to_bytes(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

        return self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @property
    def verify_key(self) -> VerifyKey:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return VerifyKey(self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    def sign(self, document: dict[str, Any]) -> str:
        return base64.b64encode(self.private.sign(canonical(document))).decode("ascii")


def parse_fingerprint(text: str) -> str:
    """A pinned fingerprint as given by an operator: 64 hex digits (an optional ``sha256:`` prefix is allowed)."""
    value = text.strip().lower().removeprefix("sha256:")
    if len(value) != 64 or any(char not in "0123456789abcdef" for char in value):
        raise ValueError("a coordinator key fingerprint is 64 hex digits, as the coordinator logs it")
    return value
