"""Encryption at rest: AES-256-GCM per chunk, with per-tenant keys from a key file.

The chunk store seals a chunk's stored bytes *after* compressing them and opens them
*before* decompressing (`seal_chunk`, `open_chunk`: the only places that do), so every tier
below it (disk, Redis) holds only ciphertext; the digest still names and verifies the
plaintext (BLAKE3 of the raw KV), so dedup, FindMissingChunks and every verification work
as before. The hot memory tier holds plaintext in the manager's RAM.

Envelope (what a tier stores in place of the encoded bytes; the stored codec then has its
high bit `SEALED` set, so any tier that keeps (codec, word size, raw size, bytes) -- the disk
file header, a Redis entry -- records that the bytes are sealed without knowing why)::

    b"CWE1" | key id length (1 byte) | key id (ASCII) | nonce (12 bytes) | ciphertext + tag (16)

The associated data binds the envelope to where it belongs: ``b"cwm.chunk.v1\\0" + tenant
+ b"\\0" + digest + codec (1) + word size (2) + raw size (8) + key id``. A file copied to
another digest or tenant, or a header whose codec or sizes were changed, fails
authentication (DATA_LOSS), and is never decrypted to wrong bytes. Nonces are random (96
bits) per chunk.

Key file (TOML, ``cwm serve --key-file PATH``; ``cwm fsck --key-file PATH``)::

    [tenants.alice]
    active = "2026-11"                 # the key new chunks are sealed with
    [tenants.alice.keys]
    "2026-11" = "base64:3q2+7w...="     # 32 bytes: "base64:..." or "hex:..." (64 hex digits)
    "2026-05" = "hex:00112233..."       # older keys still open the chunks sealed with them

Tenants without a table are stored unencrypted. A tenant whose table has keys but no
``active`` key opens its sealed chunks but seals no new ones. Chunks stored before a tenant
got a key stay unencrypted (they are not rewritten); chunks sealed with a key that is later
removed can no longer be read: deleting a tenant's keys (and restarting the manager) is
crypto-shredding. Reads of such chunks answer FAILED_PRECONDITION with reason
ENCRYPTION_KEY_UNAVAILABLE, naming the tenant and key id, and send no chunk bytes.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cwm_client.errors import FailedPrecondition
from cwm_server.manager.tiers.base import ChunkCorrupt
from cwm_server.manager.tiers.format import StoredChunk
from cwm_server.manager.toml_file import read_toml

SEALED = 0x80
"""Flag in a stored codec: the bytes are an envelope around bytes in codec `c & ~SEALED`."""
KEY_UNAVAILABLE = "ENCRYPTION_KEY_UNAVAILABLE"
"""The reason of the FAILED_PRECONDITION a read of a chunk sealed with a missing key gets."""
MAGIC = b"CWE1"
NONCE_SIZE = 12
TAG_SIZE = 16
KEY_SIZE = 32
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_AAD_PREFIX = b"cwm.chunk.v1\0"
_AAD_FIELDS = struct.Struct("<BHQ")


class KeyFileError(ValueError):
    """The key file cannot be used; the message names the file, the entry and why."""


class KeyUnavailable(Exception):
    """A sealed chunk's key is not in the keyring (deleted, or no --key-file given)."""

    def __init__(self, tenant: str, key_id: str) -> None:
        super().__init__(
            f"chunk is encrypted with key {key_id!r} of tenant {tenant!r}, which this manager "
            "does not have (deleted from the key file, or the manager runs without "
            "--key-file); its bytes cannot be read"
        )
        self.tenant = tenant
        self.key_id = key_id


class SealBroken(ChunkCorrupt):
    """An envelope that does not parse or does not authenticate: tampered, swapped or
    corrupt."""


@dataclass(frozen=True)
class TenantKeys:
    keys: Mapping[str, bytes]
    active: str = ""
    """Key id that seals new chunks; empty: this tenant's new chunks are not encrypted."""


@dataclass(frozen=True)
class Keyring:
    tenants: Mapping[str, TenantKeys] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Keyring:
        return cls.from_mapping(read_toml(path, "key file", KeyFileError), str(path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "keys") -> Keyring:
        unknown = set(data) - {"tenants"}
        if unknown:
            raise KeyFileError(f"{source}: unknown table(s) {sorted(unknown)}; use [tenants.NAME]")
        tenants: dict[str, TenantKeys] = {}
        table = data.get("tenants", {})
        if not isinstance(table, dict):
            raise KeyFileError(f"{source}: [tenants] must hold one table per tenant")
        for tenant, entry in table.items():
            where = f"{source}: [tenants.{tenant}]"
            if not isinstance(entry, dict) or set(entry) - {"active", "keys"}:
                raise KeyFileError(f"{where} takes `active` and a [keys] table only")
            raw_keys = entry.get("keys", {})
            if not isinstance(raw_keys, dict):
                raise KeyFileError(f"{where}.keys must be a table of key id = key")
            keys = {}
            for key_id, text in raw_keys.items():
                if not KEY_ID.fullmatch(key_id):
                    raise KeyFileError(
                        f"{where}: key id {key_id!r} must be 1 to 64 of [A-Za-z0-9._-]"
                    )
                keys[key_id] = parse_key(text, f"{where} key {key_id!r}")
            active = entry.get("active", "")
            if not isinstance(active, str) or (active and active not in keys):
                raise KeyFileError(f"{where}: active key {active!r} is not among its keys")
            tenants[tenant] = TenantKeys(keys=keys, active=active)
        return cls(tenants)

    def encrypts(self, tenant: str) -> bool:
        keys = self.tenants.get(tenant)
        return keys is not None and bool(keys.active)

    def seal(
        self, tenant: str, digest: bytes, codec: int, word_size: int, raw_size: int, data: bytes
    ) -> bytes:
        """The envelope of `data` under the tenant's active key."""
        keys = self.tenants[tenant]
        key_id = keys.active
        nonce = os.urandom(NONCE_SIZE)
        aad = _aad(tenant, digest, codec, word_size, raw_size, key_id)
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # see open()

        sealed = AESGCM(keys.keys[key_id]).encrypt(nonce, bytes(data), aad)
        encoded_id = key_id.encode()
        return b"".join((MAGIC, bytes((len(encoded_id),)), encoded_id, nonce, sealed))

    def open(
        self,
        tenant: str,
        digest: bytes,
        codec: int,
        word_size: int,
        raw_size: int,
        envelope: bytes | memoryview,
    ) -> bytes:
        """The bytes sealed in `envelope`; KeyUnavailable or SealBroken if they cannot be
        had."""
        key_id, nonce, sealed = parse_envelope(envelope)
        keys = self.tenants.get(tenant)
        key = keys.keys.get(key_id) if keys is not None else None
        if key is None:
            raise KeyUnavailable(tenant, key_id)
        # Imported here: OpenSSL adds to a manager's RSS, and only a manager with a key
        # file ever seals or opens a chunk.
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        try:
            return AESGCM(key).decrypt(
                nonce, bytes(sealed), _aad(tenant, digest, codec, word_size, raw_size, key_id)
            )
        except InvalidTag:
            raise SealBroken(
                f"encrypted chunk failed authentication with key {key_id!r} (tampered, "
                "corrupt, or a file moved from another chunk or tenant)"
            ) from None


def seal_chunk(
    keyring: Keyring | None, tenant: str, digest: bytes, chunk: StoredChunk
) -> StoredChunk:
    """`chunk` as a tier must store it: sealed (codec | SEALED) if the tenant has an active
    key, else `chunk` itself."""
    if keyring is None or not keyring.encrypts(tenant):
        return chunk
    sealed = keyring.seal(
        tenant, digest, chunk.codec, chunk.word_size, chunk.raw_size, bytes(chunk.data)
    )
    return StoredChunk(chunk.codec | SEALED, chunk.word_size, chunk.raw_size, sealed)


def open_chunk(
    keyring: Keyring | None, tenant: str, digest: bytes, chunk: StoredChunk
) -> StoredChunk:
    """`chunk` with its bytes opened if a tier held them sealed (else `chunk` itself). A
    key `keyring` lacks is FAILED_PRECONDITION (ENCRYPTION_KEY_UNAVAILABLE, naming the
    tenant and key id); an envelope that does not parse or authenticate raises SealBroken
    (a ChunkCorrupt: the callers' "corrupt")."""
    if not is_sealed(chunk.codec):
        return chunk
    codec = plain_codec(chunk.codec)
    try:
        if keyring is None:
            raise KeyUnavailable(tenant, parse_envelope(chunk.data)[0])
        data = keyring.open(tenant, digest, codec, chunk.word_size, chunk.raw_size, chunk.data)
    except KeyUnavailable as exc:
        raise FailedPrecondition(
            f"chunk {digest.hex()[:16]}…: {exc}; restore the key to the manager's "
            "--key-file and restart it, or delete the window if its data was shredded",
            reason=KEY_UNAVAILABLE,
            metadata={"tenant": tenant, "key_id": exc.key_id},
        ) from None
    return StoredChunk(codec, chunk.word_size, chunk.raw_size, data)


def is_sealed(codec: int) -> bool:
    return bool(codec & SEALED)


def plain_codec(codec: int) -> int:
    """The codec of the bytes inside an envelope (or `codec` itself if not sealed)."""
    return codec & ~SEALED


def parse_envelope(envelope: bytes | memoryview) -> tuple[str, bytes, memoryview]:
    """(key id, nonce, ciphertext + tag) of an envelope; SealBroken if malformed."""
    view = memoryview(envelope)
    if len(view) < len(MAGIC) + 1 or bytes(view[:4]) != MAGIC:
        raise SealBroken("not an encryption envelope (bad magic)")
    id_len = view[4]
    start = 5 + id_len
    if len(view) < start + NONCE_SIZE + TAG_SIZE:
        raise SealBroken("encryption envelope is truncated")
    try:
        key_id = bytes(view[5:start]).decode("ascii")
    except UnicodeDecodeError:
        raise SealBroken("encryption envelope has a malformed key id") from None
    return key_id, bytes(view[start : start + NONCE_SIZE]), view[start + NONCE_SIZE :]


def parse_key(text: object, where: str = "key") -> bytes:
    """32 key bytes from "base64:...", "hex:..." or bare hex (64 digits) / base64."""
    if not isinstance(text, str):
        raise KeyFileError(f"{where}: expected a string, got {type(text).__name__}")
    value = text.strip()
    try:
        if value.startswith("hex:"):
            key = bytes.fromhex(value[4:])
        elif value.startswith("base64:"):
            key = base64.b64decode(value[7:], validate=True)
        elif re.fullmatch(r"[0-9a-fA-F]{64}", value):
            key = bytes.fromhex(value)
        else:
            key = base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise KeyFileError(f"{where}: not valid hex or base64") from None
    if len(key) != KEY_SIZE:
        raise KeyFileError(f"{where}: AES-256 needs {KEY_SIZE} bytes, this is {len(key)}")
    return key


def _aad(
    tenant: str, digest: bytes, codec: int, word_size: int, raw_size: int, key_id: str
) -> bytes:
    return b"".join(
        (
            _AAD_PREFIX,
            tenant.encode(),
            b"\0",
            digest,
            _AAD_FIELDS.pack(codec, word_size, raw_size),
            key_id.encode(),
        )
    )


__all__ = [
    "KeyFileError",
    "KeyUnavailable",
    "Keyring",
    "SealBroken",
    "TenantKeys",
    "KEY_UNAVAILABLE",
    "SEALED",
    "is_sealed",
    "open_chunk",
    "seal_chunk",
    "parse_envelope",
    "plain_codec",
    "parse_key",
]
