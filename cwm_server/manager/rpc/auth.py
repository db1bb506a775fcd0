"""Who is calling: bearer tokens and client certificates, mapped to a tenant and a role.

- **Tokens.** A client sends ``authorization: Bearer <token>`` in its metadata. The auth
  file (``cwm serve --auth-file PATH``, TOML or JSON) lists the SHA-256 of each token with
  the tenant and role it acts as; the manager never holds a token itself. The presented
  token's hash is compared with *every* entry by `hmac.compare_digest`, with no early exit,
  so the time taken says nothing about how close a guess was. `cwm auth token` mints a
  token and prints the line to add.
- **Client certificates** (mutual TLS, ``--tls-client-ca``): a certificate the client CA
  signed, with a SAN URI ``cwm://TENANT/ROLE``, acts as that tenant and role without a token.
  A token, when one is sent, wins (and must be valid). An ``authorization`` header of any
  other scheme is refused (UNAUTHENTICATED), certificate or not.
- **Tenants** are ``[A-Za-z0-9._-]{1,64}`` and not only dots (`valid_tenant`), whether they
  come from the auth file or a certificate.
- **Roles** (`ROLE_METHODS`): reader, writer, agent, admin. A caller without a valid
  identity gets UNAUTHENTICATED; a role that lacks the method gets PERMISSION_DENIED.
  Health checks and server reflection (methods under ``/grpc.``) stay open.
- **Auth off** (no auth file, no client CA): every call is tenant ``default`` as admin,
  as before authentication existed.

The caller is resolved by the RPC interceptor (`interceptors/authentication.py`) before the
request is parsed and kept in a context variable for the call, which
`tenancy.current_tenant` reads (see tenancy.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc.aio

from cwm_client.errors import PermissionDenied, Unauthenticated

READER = "reader"
WRITER = "writer"
AGENT = "agent"
ADMIN = "admin"
ROLES = (READER, WRITER, AGENT, ADMIN)

_WINDOWS = "/cwm.v1.WindowService/"
_SESSIONS = "/cwm.v1.SessionService/"
_KEYED = "/cwm.v1.KeyedChunkService/"
_READ = frozenset(
    {
        _WINDOWS + "ListWindows",
        _WINDOWS + "GetWindow",
        _WINDOWS + "Thaw",
        _WINDOWS + "FindMissingChunks",
        _SESSIONS + "ListAgents",
        _SESSIONS + "ListSessions",
        _KEYED + "GetKeyedChunks",
        _KEYED + "ContainsPrefix",
        _KEYED + "ListKeys",
    }
)
_WRITE = _READ | {
    _WINDOWS + "Freeze",
    _WINDOWS + "OfferBulkFreeze",
    _WINDOWS + "CloneWindow",
    _WINDOWS + "DeleteWindow",
    _SESSIONS + "FreezeSession",
    _SESSIONS + "ThawWindow",
    _KEYED + "PutKeyedChunks",
    _KEYED + "DeleteKeys",
    _KEYED + "PromoteKeysToWindow",
}
_AGENT = frozenset(
    {
        _SESSIONS + "Connect",
        _WINDOWS + "Freeze",
        _WINDOWS + "OfferBulkFreeze",
        _WINDOWS + "Thaw",
        _WINDOWS + "GetWindow",  # a thaw reads the window first (and plans its streams)
        _WINDOWS + "FindMissingChunks",
        # an engine-side KV connector (LMCache) stores and loads keyed chunks
        _KEYED + "PutKeyedChunks",
        _KEYED + "GetKeyedChunks",
        _KEYED + "ContainsPrefix",
    }
)
ROLE_METHODS: dict[str, frozenset[str] | None] = {
    READER: _READ,
    WRITER: _WRITE,
    AGENT: _AGENT,
    ADMIN: None,  # every method, including ones added later
}
"""The methods each role may call (None: all). A method no role lists is admin-only."""

OPEN_PREFIXES = ("/grpc.",)
"""Health checks and server reflection: open to anyone who reaches the port."""

TENANT_RE = re.compile(r"\A[A-Za-z0-9._-]{1,64}\Z")
TOKEN_PREFIX = "cwm_"
CERT_URI_SCHEME = "cwm://"
_BEARER = "bearer "


@dataclass(frozen=True)
class Caller:
    """Who a call runs as."""

    tenant: str
    role: str
    via: str = "none"
    """How it was established: token, certificate, or none (auth off)."""

    def may_call(self, method: str) -> bool:
        allowed = ROLE_METHODS[self.role]
        return allowed is None or method in allowed


@dataclass(frozen=True)
class TokenEntry:
    sha256: bytes
    tenant: str
    role: str
    name: str = ""


class AuthConfigError(ValueError):
    """An auth file that cannot be used; the message names the file and the entry."""


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token, as the auth file lists it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def mint_token() -> str:
    """A new random token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def valid_tenant(tenant: str) -> bool:
    """A tenant name: 1-64 of A-Z a-z 0-9 . _ -, and not only dots (a tenant is a
    directory under chunks/, and "." or ".." would be the directory itself or its parent)."""
    return bool(TENANT_RE.match(tenant)) and tenant.strip(".") != ""


def check_tenant(tenant: str) -> str:
    if not TENANT_RE.match(tenant):
        raise ValueError(f"tenant {tenant!r} must be 1-64 characters from A-Z a-z 0-9 . _ -")
    if not valid_tenant(tenant):
        raise ValueError(f"tenant {tenant!r} must not be only dots")
    return tenant


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role {role!r} must be one of {', '.join(ROLES)}")
    return role


def token_line(token: str, tenant: str, role: str, name: str = "") -> str:
    """The TOML entry that lets `token` act as `tenant`/`role` (the token is not in it)."""
    lines = ["[[tokens]]"]
    if name:
        lines.append(f"name = {json.dumps(name)}")
    lines += [f'sha256 = "{hash_token(token)}"', f'tenant = "{tenant}"', f'role = "{role}"']
    return "\n".join(lines) + "\n"


def load_auth_file(path: Path) -> list[TokenEntry]:
    """The token entries of a TOML or JSON auth file: ``[[tokens]]`` tables (or a JSON
    ``{"tokens": [...]}``) with ``sha256``, ``tenant``, ``role`` and an optional ``name``."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AuthConfigError(f"auth file {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() == ".json" or raw.lstrip().startswith(b"{"):
            data: Any = json.loads(raw)
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise AuthConfigError(f"auth file {path}: not valid TOML or JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("tokens", []), list):
        raise AuthConfigError(f"auth file {path}: expected a list of [[tokens]] entries")
    entries = []
    seen: set[bytes] = set()
    for number, item in enumerate(data.get("tokens", []), 1):
        where = f"auth file {path}: tokens entry {number}"
        if not isinstance(item, dict):
            raise AuthConfigError(f"{where}: expected a table")
        unknown = set(item) - {"sha256", "tenant", "role", "name"}
        if unknown:
            raise AuthConfigError(f"{where}: unknown keys {sorted(unknown)}")
        digest = item.get("sha256")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise AuthConfigError(f"{where}: sha256 must be 64 hex digits (`cwm auth token`)")
        try:
            tenant = check_tenant(str(item.get("tenant", "")))
            role = check_role(str(item.get("role", "")))
        except ValueError as exc:
            raise AuthConfigError(f"{where}: {exc}") from None
        key = bytes.fromhex(digest)
        if key in seen:
            raise AuthConfigError(f"{where}: the same token hash is listed twice")
        seen.add(key)
        entries.append(TokenEntry(key, tenant, role, str(item.get("name", ""))))
    return entries


def _cert_identity(context: grpc.aio.ServicerContext) -> Caller | None:
    """The tenant and role of a verified client certificate's ``cwm://TENANT/ROLE`` URI."""
    try:
        auth = context.auth_context()
    except Exception:  # noqa: BLE001 - no auth context on an insecure port
        return None
    for key in ("peer_uri", "x509_subject_alternative_name"):
        for value in auth.get(key, ()):
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            if not text.startswith(CERT_URI_SCHEME):
                continue
            tenant, _, role = text[len(CERT_URI_SCHEME) :].partition("/")
            if valid_tenant(tenant) and role in ROLES:
                return Caller(tenant, role, via="certificate")
    return None


class Authenticator:
    """Resolves a call's `Caller` from its metadata and TLS peer, or refuses it."""

    def __init__(self, tokens: Sequence[TokenEntry] = (), *, certificates: bool = False) -> None:
        self._tokens = list(tokens)
        self._certificates = certificates

    @classmethod
    def from_file(cls, path: Path | None, *, certificates: bool = False) -> Authenticator:
        return cls(load_auth_file(path) if path else (), certificates=certificates)

    def _token_caller(self, token: str) -> Caller | None:
        presented = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: TokenEntry | None = None
        for entry in self._tokens:  # every entry, no early exit: constant time in the guess
            if hmac.compare_digest(presented, entry.sha256):
                found = entry
        return None if found is None else Caller(found.tenant, found.role, via="token")

    def identify(self, context: grpc.aio.ServicerContext) -> Caller:
        """Who is calling, from the bearer token or else the client certificate; raises
        Unauthenticated when neither names a known identity."""
        token = bearer_token(context.invocation_metadata())
        if token is not None:
            caller = self._token_caller(token)
            if caller is None:
                raise Unauthenticated(
                    "the bearer token is not one this manager knows; ask its operator for a "
                    "token (`cwm auth token`) and pass it with --token or $CWM_TOKEN",
                    reason="UNKNOWN_TOKEN",
                )
            return caller
        caller = _cert_identity(context) if self._certificates else None
        if caller is None:
            how = " or a client certificate for cwm://TENANT/ROLE" if self._certificates else ""
            raise Unauthenticated(
                "this manager requires authentication: send `authorization: Bearer <token>` "
                f"(--token or $CWM_TOKEN){how}",
                reason="NO_CREDENTIALS",
            )
        return caller

    def authenticate(self, method: str, context: grpc.aio.ServicerContext) -> Caller:
        """The caller of `method`; raises Unauthenticated or PermissionDenied."""
        caller = self.identify(context)
        authorize(caller, method)
        return caller


def authorize(caller: Caller, method: str) -> None:
    """Raise PermissionDenied unless the caller's role may call `method`."""
    if not caller.may_call(method):
        raise PermissionDenied(
            f"role {caller.role!r} of tenant {caller.tenant!r} may not call "
            f"{method.rsplit('/', 1)[-1]}",
            reason="ROLE_FORBIDS_METHOD",
            metadata={"role": caller.role, "method": method},
        )


def bearer_token(metadata: Sequence[tuple[str, Any]] | Mapping[str, Any] | None) -> str | None:
    """The token of the call's ``authorization: Bearer`` header, or None if it sent no
    authorization header. An authorization header of another scheme (Basic, a bare token)
    raises Unauthenticated: it is a credential the manager cannot check, and taking it
    for "no credentials" would let a client certificate speak for a caller who meant to
    present something else."""
    items = metadata.items() if isinstance(metadata, Mapping) else (metadata or ())
    for key, value in items:
        if key != "authorization":
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == _BEARER.strip():
            return token.strip()
        raise Unauthenticated(
            "the authorization header must be `Bearer <token>`: only bearer tokens are "
            "supported (pass the token with --token or $CWM_TOKEN; the client adds the "
            "scheme)",
            reason="UNSUPPORTED_AUTH_SCHEME",
        )
    return None


def is_open(method: str) -> bool:
    return method.startswith(OPEN_PREFIXES)
