"""Authentication: bearer tokens, roles, TLS and mutual TLS, against real managers.

Every call goes through raw generated stubs (or a raw-bytes channel), so the SDK cannot hide
a manager that lets an unauthenticated or under-privileged caller through.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cwm_client import Credentials, SessionClient, WindowClient, pb
from cwm_client._common import build_header, freeze_requests
from cwm_client.errors import PermissionDenied, Unauthenticated, from_rpc_error
from cwm_server.cli.main import main as cwm_main
from cwm_server.manager.config import ManagerConfig, ServerOptions
from cwm_server.manager.rpc import auth
from cwm_server.manager.server import ManagerServer
from tests.helpers import (
    FINGERPRINT,
    ROOT,
    ThreadedManager,
    chunk_files,
    synthetic_chunks,
    token_ids,
)
from tests.tls_certs import CertificateAuthority

Code = grpc.StatusCode
TOKENS = {role: auth.mint_token() for role in auth.ROLES}
OTHER_TOKEN = auth.mint_token()  # tenant "other", writer
CHUNKS = synthetic_chunks(300, seed=3)
IDS = token_ids(300, seed=3)

WINDOWS = "/cwm.v1.WindowService/"
SESSIONS = "/cwm.v1.SessionService/"
# every RPC of both services: (method, request kind, a valid request)
RPCS: list[tuple[str, str, object]] = [
    (WINDOWS + "Freeze", "stream_unary", pb.FreezeRequest(header=pb.FreezeHeader(name="w"))),
    (WINDOWS + "Thaw", "unary_stream", pb.ThawRequest(name="w")),
    (WINDOWS + "FindMissingChunks", "unary_unary", pb.FindMissingChunksRequest()),
    (WINDOWS + "ListWindows", "unary_unary", pb.ListWindowsRequest()),
    (WINDOWS + "GetWindow", "unary_unary", pb.GetWindowRequest(name="w")),
    (WINDOWS + "CloneWindow", "unary_unary", pb.CloneWindowRequest(source_name="w", new_name="w2")),
    (WINDOWS + "DeleteWindow", "unary_unary", pb.DeleteWindowRequest(name="w")),
    (
        WINDOWS + "OfferBulkFreeze",
        "unary_unary",
        pb.OfferBulkFreezeRequest(header=pb.FreezeHeader(name="w")),
    ),
    (SESSIONS + "Connect", "stream_stream", pb.ConnectRequest(hello=pb.AgentHello(agent_id="a"))),
    (SESSIONS + "ListAgents", "unary_unary", pb.ListAgentsRequest()),
    (SESSIONS + "ListSessions", "unary_unary", pb.ListSessionsRequest()),
    (
        SESSIONS + "FreezeSession",
        "unary_unary",
        pb.FreezeSessionRequest(session_id="s", window_name="w"),
    ),
    (SESSIONS + "ThawWindow", "unary_unary", pb.ThawWindowRequest(window_name="w")),
]
RPC_IDS = [m.rsplit("/", 1)[1] for m, _, _ in RPCS]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`cwm` run in-process points structlog at the captured stderr; put it back after."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def write_auth_file(path: Path) -> Path:
    lines = [auth.token_line(TOKENS[role], "acme", role, name=role) for role in auth.ROLES]
    lines.append(auth.token_line(OTHER_TOKEN, "other", "writer"))
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedManager]:
    root = tmp_path_factory.mktemp("auth")
    options = ServerOptions(auth_file=write_auth_file(root / "auth.toml"))
    running = ThreadedManager(
        ManagerConfig(data_dir=root / "data", listen="127.0.0.1:0", fsync=False), options
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(secured: ThreadedManager) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(secured.target) as ch:
        yield ch


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def invoke(
    channel: grpc.Channel, method: str, kind: str, request: object, metadata: object = ()
) -> object:
    """Call `method` with `request` (serialized as given); return the response or raise."""
    raw = request if isinstance(request, bytes) else request.SerializeToString()  # type: ignore[attr-defined]
    ident: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
    callable_ = getattr(channel, kind)(
        method, request_serializer=ident, response_deserializer=ident
    )
    if kind == "unary_unary":
        return callable_(raw, metadata=metadata, timeout=10)
    if kind == "unary_stream":
        return list(callable_(raw, metadata=metadata, timeout=10))
    if kind == "stream_unary":
        return callable_(iter([raw]), metadata=metadata, timeout=10)
    return list(callable_(iter([raw]), metadata=metadata, timeout=10))


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details() or ""


@pytest.mark.parametrize(("method", "kind", "request_"), RPCS, ids=RPC_IDS)
@pytest.mark.parametrize(
    "metadata",
    [
        (),
        bearer("cwm_not-a-token"),
        bearer(""),
        (("authorization", "Basic dXNlcjpwYXNz"),),
        (("authorization", TOKENS["admin"]),),  # no "Bearer " scheme
    ],
    ids=["none", "wrong", "empty", "basic", "no-scheme"],
)
def test_every_rpc_refuses_a_caller_without_a_valid_token(
    channel: grpc.Channel, method: str, kind: str, request_: object, metadata: object
) -> None:
    code, details = code_of(lambda: invoke(channel, method, kind, request_, metadata))
    assert code == Code.UNAUTHENTICATED, details
    assert "token" in details


@pytest.mark.parametrize(("method", "kind", "request_"), RPCS, ids=RPC_IDS)
def test_authentication_comes_before_parsing(
    channel: grpc.Channel, method: str, kind: str, request_: object
) -> None:
    """Garbage bytes from an unauthenticated peer: UNAUTHENTICATED, not INVALID_ARGUMENT."""
    code, _ = code_of(lambda: invoke(channel, method, kind, b"\xff\xff\xff\x0f garbage"))
    assert code == Code.UNAUTHENTICATED


def _stub(channel: grpc.Channel) -> pb.WindowServiceStub:
    return pb.WindowServiceStub(channel)


def _freeze(channel: grpc.Channel, token: str, name: str) -> pb.FreezeResponse:
    header = build_header(name, CHUNKS, fingerprint=FINGERPRINT, token_ids=IDS)
    response: pb.FreezeResponse = _stub(channel).Freeze(
        freeze_requests(header, CHUNKS), metadata=bearer(token), timeout=30
    )
    return response


def _names(channel: grpc.Channel, token: str) -> list[str]:
    listed = _stub(channel).ListWindows(pb.ListWindowsRequest(), metadata=bearer(token))
    return [w.name for w in listed.windows]


def test_reader_cannot_freeze_and_nothing_is_stored(
    secured: ThreadedManager, channel: grpc.Channel
) -> None:
    before = chunk_files(secured.config.data_dir)
    code, details = code_of(lambda: _freeze(channel, TOKENS["reader"], "by-reader"))
    assert code == Code.PERMISSION_DENIED
    assert "reader" in details and "Freeze" in details
    assert chunk_files(secured.config.data_dir) == before
    assert "by-reader" not in _names(channel, TOKENS["admin"])
    missing = _stub(channel).FindMissingChunks(
        pb.FindMissingChunksRequest(digests=[c.digest for c in CHUNKS]),
        metadata=bearer(TOKENS["admin"]),
    )
    assert len(missing.missing_digests) == len(CHUNKS)


def test_roles(secured: ThreadedManager, channel: grpc.Channel) -> None:
    stub = _stub(channel)
    _freeze(channel, TOKENS["writer"], "roles-w")
    # a reader reads, lists and thaws ...
    assert "roles-w" in _names(channel, TOKENS["reader"])
    got = stub.GetWindow(pb.GetWindowRequest(name="roles-w"), metadata=bearer(TOKENS["reader"]))
    assert got.window.token_count == len(IDS)
    thawed = list(stub.Thaw(pb.ThawRequest(name="roles-w"), metadata=bearer(TOKENS["reader"])))
    assert thawed[0].window.name == "roles-w"
    # ... but cannot delete, clone or order agents, and the window is untouched
    for call in (
        lambda: stub.DeleteWindow(
            pb.DeleteWindowRequest(name="roles-w"), metadata=bearer(TOKENS["reader"])
        ),
        lambda: stub.CloneWindow(
            pb.CloneWindowRequest(source_name="roles-w", new_name="roles-c"),
            metadata=bearer(TOKENS["reader"]),
        ),
        lambda: pb.SessionServiceStub(channel).FreezeSession(
            pb.FreezeSessionRequest(session_id="s", window_name="x"),
            metadata=bearer(TOKENS["reader"]),
        ),
        lambda: pb.SessionServiceStub(channel).ThawWindow(
            pb.ThawWindowRequest(window_name="roles-w"), metadata=bearer(TOKENS["reader"])
        ),
    ):
        assert code_of(call)[0] == Code.PERMISSION_DENIED
    names = _names(channel, TOKENS["admin"])
    assert "roles-w" in names and "roles-c" not in names
    # an agent freezes, thaws and asks what is missing, but cannot list or delete
    _freeze(channel, TOKENS["agent"], "roles-agent")
    list(stub.Thaw(pb.ThawRequest(name="roles-agent"), metadata=bearer(TOKENS["agent"])))
    for call in (
        lambda: _names(channel, TOKENS["agent"]),
        lambda: stub.DeleteWindow(
            pb.DeleteWindowRequest(name="roles-agent"), metadata=bearer(TOKENS["agent"])
        ),
        lambda: pb.SessionServiceStub(channel).ListSessions(
            pb.ListSessionsRequest(), metadata=bearer(TOKENS["agent"])
        ),
    ):
        assert code_of(call)[0] == Code.PERMISSION_DENIED
    # a reader cannot act as an agent
    code, _ = code_of(
        lambda: invoke(channel, RPCS[7][0], "stream_stream", RPCS[7][2], bearer(TOKENS["reader"]))
    )
    assert code == Code.PERMISSION_DENIED
    # writer deletes; admin does everything
    stub.DeleteWindow(pb.DeleteWindowRequest(name="roles-w"), metadata=bearer(TOKENS["writer"]))
    stub.DeleteWindow(pb.DeleteWindowRequest(name="roles-agent"), metadata=bearer(TOKENS["admin"]))
    assert not {"roles-w", "roles-agent"} & set(_names(channel, TOKENS["admin"]))


def test_health_and_reflection_need_no_token(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(
        reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
    )
    names = {s.name for s in answers[0].list_services_response.service}
    assert "cwm.v1.WindowService" in names


def test_unknown_method_needs_a_token_first(channel: grpc.Channel) -> None:
    method = "/cwm.v1.WindowService/NoSuchMethod"
    assert code_of(lambda: invoke(channel, method, "unary_unary", b""))[0] == Code.UNAUTHENTICATED
    code, _ = code_of(lambda: invoke(channel, method, "unary_unary", b"", bearer(TOKENS["reader"])))
    assert code == Code.UNIMPLEMENTED


def test_sdk_clients_send_the_token(secured: ThreadedManager) -> None:
    with WindowClient(secured.target, token=TOKENS["writer"]) as client:
        client.freeze("sdk", CHUNKS, fingerprint=FINGERPRINT, token_ids=IDS)
        assert [w.name for w in client.list()] == ["sdk"]
        client.delete("sdk")
    with WindowClient(secured.target) as anonymous, pytest.raises(Unauthenticated):
        anonymous.list_page()
    with (
        WindowClient(secured.target, token=TOKENS["reader"]) as reader,
        pytest.raises(PermissionDenied),
    ):
        reader.delete("sdk")
    with SessionClient(secured.target, credentials=Credentials(token=TOKENS["reader"])) as s:
        assert s.list_agents() == []


async def test_async_client_sends_the_token(secured: ThreadedManager) -> None:
    from cwm_client import AsyncSessionClient, AsyncWindowClient

    async with AsyncWindowClient(secured.target, token=TOKENS["reader"]) as client:
        await client.list_page()
    async with AsyncSessionClient(secured.target) as anonymous:
        with pytest.raises(Unauthenticated):
            await anonymous.list_agents()


def test_cli_token_flag_and_env(
    secured: ThreadedManager,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("CWM_TOKEN", "CWM_CONFIG", "CWM_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", "/nonexistent")  # no config file either
    assert cwm_main(["ls", "--manager", secured.target, "--json"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert cwm_main(["ls", "--manager", secured.target, "--json", "--token", TOKENS["reader"]]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), list)
    monkeypatch.setenv("CWM_TOKEN", TOKENS["reader"])
    assert cwm_main(["agents", "--manager", secured.target, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert cwm_main(["rm", "nothing", "--manager", secured.target]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err


def test_cwm_auth_token_mints_a_working_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cwm_main(["auth", "token", "--tenant", "t1", "--role", "reader"]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert token.startswith("cwm_") and len(token) >= 40
    assert token not in out.err  # the entry holds the hash only
    path = tmp_path / "auth.toml"
    path.write_text(out.err)  # comments and the [[tokens]] entry: valid TOML as printed
    (entry,) = auth.load_auth_file(path)
    assert (entry.tenant, entry.role) == ("t1", "reader")
    assert entry.sha256.hex() == auth.hash_token(token)
    json_path = tmp_path / "auth.json"
    json_path.write_text(
        json.dumps({"tokens": [{"sha256": entry.sha256.hex(), "tenant": "t1", "role": "admin"}]})
    )
    assert auth.load_auth_file(json_path)[0].role == "admin"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ('[[tokens]]\nsha256 = "abc"\ntenant = "t"\nrole = "reader"\n', "64 hex"),
        (f'[[tokens]]\nsha256 = "{"a" * 64}"\ntenant = "t"\nrole = "root"\n', "role"),
        (f'[[tokens]]\nsha256 = "{"a" * 64}"\ntenant = "a/b"\nrole = "reader"\n', "tenant"),
        (
            f'[[tokens]]\nsha256 = "{"a" * 64}"\ntenant = "t"\nrole = "reader"\ntoken = "x"\n',
            "unknown keys",
        ),
        ("tokens = [", "not valid"),
    ],
)
def test_bad_auth_files_are_refused_with_a_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, complaint: str
) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(text)
    with pytest.raises(auth.AuthConfigError, match=complaint):
        auth.load_auth_file(path)
    code = cwm_main(["serve", "--data-dir", str(tmp_path / "d"), "--auth-file", str(path)])
    assert code == 2
    assert complaint in capsys.readouterr().err


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture(scope="module")
def tls_manager(
    tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority
) -> Iterator[ThreadedManager]:
    root = tmp_path_factory.mktemp("tls")
    cert, key = ca.server().write(root, "server")
    options = ServerOptions(
        auth_file=write_auth_file(root / "auth.toml"), tls_cert=cert, tls_key=key
    )
    running = ThreadedManager(
        ManagerConfig(data_dir=root / "data", listen="127.0.0.1:0", fsync=False), options
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def mtls_manager(
    tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority
) -> Iterator[ThreadedManager]:
    root = tmp_path_factory.mktemp("mtls")
    cert, key = ca.server().write(root, "server")
    ca_file = root / "ca.crt"
    ca_file.write_bytes(ca.pem)
    options = ServerOptions(
        auth_file=write_auth_file(root / "auth.toml"),
        tls_cert=cert,
        tls_key=key,
        tls_client_ca=ca_file,
    )
    running = ThreadedManager(
        ManagerConfig(data_dir=root / "data", listen="127.0.0.1:0", fsync=False), options
    )
    yield running
    running.stop()


def test_tls_with_a_token(tls_manager: ThreadedManager, ca: CertificateAuthority) -> None:
    with WindowClient(
        tls_manager.target, token=TOKENS["writer"], root_certificates=ca.pem, timeout=10
    ) as client:
        client.freeze("tls", CHUNKS, fingerprint=FINGERPRINT, token_ids=IDS)
        with client.thaw("tls") as stream:
            assert [c.data for c in stream] == [c.raw for c in CHUNKS]
    with (
        WindowClient(tls_manager.target, root_certificates=ca.pem, timeout=10) as anonymous,
        pytest.raises(Unauthenticated),
    ):
        anonymous.list_page()
    # plaintext to a TLS port never gets an answer
    with grpc.insecure_channel(tls_manager.target) as plain:
        code, _ = code_of(
            lambda: _stub(plain).ListWindows(
                pb.ListWindowsRequest(), metadata=bearer(TOKENS["reader"]), timeout=5
            )
        )
    assert code == Code.UNAVAILABLE
    # a client that does not trust the manager's CA refuses it
    with WindowClient(
        tls_manager.target,
        token=TOKENS["reader"],
        root_certificates=CertificateAuthority().pem,
        timeout=5,
    ) as wrong_ca:
        with pytest.raises(Exception) as caught:
            wrong_ca.list_page()
        assert getattr(caught.value, "code", None) == Code.UNAVAILABLE


def test_mtls_certificate_is_the_identity(
    mtls_manager: ThreadedManager, ca: CertificateAuthority, tmp_path: Path
) -> None:
    writer = ca.client("acme", "writer")
    with WindowClient(
        mtls_manager.target,
        root_certificates=ca.pem,
        certificate_chain=writer.cert,
        private_key=writer.key,
        timeout=10,
    ) as client:
        client.freeze("by-cert", CHUNKS, fingerprint=FINGERPRINT, token_ids=IDS)
    # the certificate acted as tenant acme: acme's token sees the window, other's does not
    reader = ca.client("acme", "reader")
    creds = Credentials(
        root_certificates=ca.pem, certificate_chain=reader.cert, private_key=reader.key
    )
    with WindowClient(mtls_manager.target, credentials=creds, timeout=10) as by_reader:
        assert [w.name for w in by_reader.list()] == ["by-cert"]
        with pytest.raises(PermissionDenied):
            by_reader.delete("by-cert")
    other = Credentials(
        token=OTHER_TOKEN,
        root_certificates=ca.pem,
        certificate_chain=reader.cert,
        private_key=reader.key,
    )
    with WindowClient(mtls_manager.target, credentials=other, timeout=10) as as_other:
        assert list(as_other.list()) == []  # a token wins over the certificate
    # a certificate without a cwm:// identity authenticates nobody
    anonymous_cert = ca.issue("no-identity")
    with (
        WindowClient(
            mtls_manager.target,
            root_certificates=ca.pem,
            certificate_chain=anonymous_cert.cert,
            private_key=anonymous_cert.key,
            timeout=10,
        ) as nobody,
        pytest.raises(Unauthenticated),
    ):
        nobody.list_page()
    # the CLI takes the same material from files
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.pem)
    cert_file, key_file = reader.write(tmp_path, "reader")
    args = ["ls", "--manager", mtls_manager.target, "--json", "--tls-ca", str(ca_file)]
    assert cwm_main([*args, "--tls-cert", str(cert_file), "--tls-key", str(key_file)]) == 0


@pytest.mark.parametrize("who", ["no-cert", "foreign-ca"])
def test_mtls_refuses_a_client_without_a_trusted_cert(
    mtls_manager: ThreadedManager, ca: CertificateAuthority, who: str
) -> None:
    if who == "no-cert":
        creds = Credentials(token=TOKENS["admin"], root_certificates=ca.pem)
    else:
        foreign = CertificateAuthority("foreign").client("acme", "admin")
        creds = Credentials(
            root_certificates=ca.pem, certificate_chain=foreign.cert, private_key=foreign.key
        )
    with grpc.secure_channel(mtls_manager.target, creds.channel_credentials()) as channel:  # type: ignore[arg-type]
        code, _ = code_of(
            lambda: _stub(channel).ListWindows(
                pb.ListWindowsRequest(), metadata=creds.metadata(), timeout=5
            )
        )
    assert code == Code.UNAVAILABLE  # the handshake fails: no RPC ever runs


# -- exposure warning -----------------------------------------------------------------------


async def test_no_auth_off_loopback_warns_loudly(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    server = ManagerServer(ManagerConfig(data_dir=tmp_path / "open", listen="0.0.0.0:0"))
    await server.start()
    await server.stop(0)
    err = capfd.readouterr().err
    assert "WARNING" in err and "NO AUTHENTICATION" in err
    # on loopback, or with auth and TLS, nothing is said
    quiet = ManagerServer(ManagerConfig(data_dir=tmp_path / "lo", listen="127.0.0.1:0"))
    await quiet.start()
    await quiet.stop(0)
    assert "NO AUTHENTICATION" not in capfd.readouterr().err


async def test_tokens_without_tls_off_loopback_warn(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    options = ServerOptions(auth_file=write_auth_file(tmp_path / "auth.toml"))
    server = ManagerServer(ManagerConfig(data_dir=tmp_path / "d", listen="0.0.0.0:0"), options)
    await server.start()
    await server.stop(0)
    assert "without TLS" in capfd.readouterr().err


# -- the MCP bridge -------------------------------------------------------------------------


@pytest.mark.parametrize("with_token", [True, False], ids=["token", "no-token"])
async def test_mcp_bridge_passes_the_token(
    secured: ThreadedManager, tmp_path: Path, with_token: bool
) -> None:
    """`cwm mcp` (stdio, as MCP clients launch it) calls the manager with $CWM_TOKEN."""
    pytest.importorskip("mcp")
    import os
    import sys

    from mcp import Client, StdioServerParameters
    from mcp.client.stdio import stdio_client
    from mcp.types import TextContent

    env = {k: v for k, v in os.environ.items() if not k.startswith("CWM_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "no-config")
    if with_token:
        env["CWM_TOKEN"] = TOKENS["reader"]
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "cwm_server.cli.main", "mcp", "--manager", secured.target],
        cwd=str(ROOT),
        env=env,
    )
    with (tmp_path / "bridge.log").open("a") as errlog:
        async with Client(stdio_client(params, errlog=errlog), mode="legacy") as client:
            result = await client.call_tool("window_list", {})
    text = "\n".join(c.text for c in result.content if isinstance(c, TextContent))
    if with_token:
        assert not result.is_error, text
    else:
        assert result.is_error and "UNAUTHENTICATED" in text, text


def test_agent_and_mcp_take_the_auth_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cwm_server.cli.main import build_parser
    from cwm_server.cli.options import client_credentials
    from cwm_server.settings.rendering import REDACTED, redact

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("CWM_CONFIG", raising=False)
    monkeypatch.setenv("CWM_TOKEN", "from-env")
    parser = build_parser()
    agent = parser.parse_args(["agent", "--agent-id", "a", "--token", "from-flag"])
    assert client_credentials(agent).token == "from-flag"
    mcp = parser.parse_args(["mcp"])
    assert client_credentials(mcp).token == "from-env"
    assert client_credentials(mcp).metadata() == (("authorization", "Bearer from-env"),)
    assert redact("client.token", "from-env") == REDACTED


def test_role_table() -> None:
    """Every RPC of both services is covered above, and the roles allow exactly the table in
    docs/SECURITY.md (unknown methods: admin only)."""
    for service in ("WindowService", "SessionService"):
        descriptor = pb.FreezeRequest.DESCRIPTOR.file.pool.FindServiceByName(f"cwm.v1.{service}")
        assert {f"/cwm.v1.{service}/{m.name}" for m in descriptor.methods} <= {
            m for m, _, _ in RPCS
        }

    def allowed(role: str) -> set[str]:
        caller = auth.Caller("t", role)
        return {m.rsplit("/", 1)[1] for m, _, _ in RPCS if caller.may_call(m)}

    reads = {"ListWindows", "GetWindow", "Thaw", "FindMissingChunks", "ListAgents", "ListSessions"}
    writes = {
        "Freeze",
        "OfferBulkFreeze",
        "CloneWindow",
        "DeleteWindow",
        "FreezeSession",
        "ThawWindow",
    }
    assert allowed("reader") == reads
    assert allowed("writer") == reads | writes
    assert allowed("agent") == {
        "Connect",
        "Freeze",
        "OfferBulkFreeze",
        "Thaw",
        "GetWindow",
        "FindMissingChunks",
    }
    assert allowed("admin") == {m.rsplit("/", 1)[1] for m, _, _ in RPCS}
    future = "/cwm.v1.WindowService/SomethingNew"
    assert [r for r in auth.ROLES if auth.Caller("t", r).may_call(future)] == ["admin"]
    keyed = "/cwm.v1.KeyedChunkService/"
    assert auth.Caller("t", "agent").may_call(keyed + "PutKeyedChunks")
    assert not auth.Caller("t", "reader").may_call(keyed + "PutKeyedChunks")
    assert auth.Caller("t", "reader").may_call(keyed + "GetKeyedChunks")
    assert not auth.Caller("t", "agent").may_call(keyed + "DeleteKeys")


def test_auth_settings_come_from_the_config_file(tmp_path: Path) -> None:
    from cwm_server.settings.loading import load
    from cwm_server.settings.rendering import to_toml
    from cwm_server.settings.serve import server_options

    path = tmp_path / "config.toml"
    path.write_text(
        '[serve]\nauth_file = "/etc/cwm/auth.toml"\ntls_cert = "/etc/cwm/server.crt"\n'
        'tls_key = "/etc/cwm/server.key"\n[client]\ntoken = "abc"\ntls_ca = "/etc/cwm/ca.crt"\n'
    )
    effective = load({}, str(path), environ={})
    assert not effective.ignored
    options = server_options(effective)
    assert options.auth_file == Path("/etc/cwm/auth.toml")
    assert options.tls_client_ca is None
    assert effective["client.token"] == "abc"
    assert "abc" not in to_toml(effective)  # the token is redacted


# -- review fixes: tenants of only dots, non-Bearer authorization headers ---------------------


def _files_outside_catalog(data_dir: Path) -> set[Path]:
    return {p for p in data_dir.rglob("*") if p.is_file() and not p.name.startswith("catalog")}


@pytest.mark.parametrize("tenant", [".", "..", "..."])
def test_auth_file_refuses_a_tenant_of_only_dots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tenant: str
) -> None:
    """A tenant is a directory under chunks/: ".." would put its chunks beside chunks/."""
    path = tmp_path / "auth.toml"
    path.write_text(auth.token_line(auth.mint_token(), tenant, "admin"))
    with pytest.raises(auth.AuthConfigError, match="only dots"):
        auth.load_auth_file(path)
    code = cwm_main(["serve", "--data-dir", str(tmp_path / "d"), "--auth-file", str(path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "only dots" in err and "tokens entry 1" in err
    assert not (tmp_path / "d").exists()
    # dots beside other characters stay allowed, as before
    path.write_text(auth.token_line(auth.mint_token(), "a..b", "admin"))
    assert [e.tenant for e in auth.load_auth_file(path)] == ["a..b"]
    assert not auth.valid_tenant("..") and auth.valid_tenant("..a")


@pytest.mark.parametrize("tenant", [".", ".."])
def test_mtls_certificate_for_a_tenant_of_only_dots_authenticates_nobody(
    mtls_manager: ThreadedManager, ca: CertificateAuthority, tenant: str
) -> None:
    pem = ca.client(tenant, "admin")
    creds = Credentials(root_certificates=ca.pem, certificate_chain=pem.cert, private_key=pem.key)
    data_dir = mtls_manager.config.data_dir
    before = _files_outside_catalog(data_dir)
    header = build_header("dots", CHUNKS, fingerprint=FINGERPRINT, token_ids=IDS)
    with grpc.secure_channel(mtls_manager.target, creds.channel_credentials()) as channel:  # type: ignore[arg-type]
        code, details = code_of(
            lambda: _stub(channel).Freeze(freeze_requests(header, CHUNKS), timeout=10)
        )
        assert code == Code.UNAUTHENTICATED, details
        code, _ = code_of(lambda: _stub(channel).ListWindows(pb.ListWindowsRequest(), timeout=10))
        assert code == Code.UNAUTHENTICATED
    assert _files_outside_catalog(data_dir) == before


@pytest.mark.parametrize(
    "value",
    ["Basic dXNlcjpwYXNz", "Token {admin}", "{admin}"],
    ids=["basic", "other-scheme", "no-scheme"],
)
def test_a_non_bearer_authorization_header_says_only_bearer_is_supported(
    channel: grpc.Channel, value: str
) -> None:
    metadata = (("authorization", value.format(admin=TOKENS["admin"])),)
    with pytest.raises(grpc.RpcError) as caught:
        _stub(channel).ListWindows(pb.ListWindowsRequest(), metadata=metadata, timeout=10)
    assert caught.value.code() == Code.UNAUTHENTICATED
    error = from_rpc_error(caught.value)
    assert error.reason == "UNSUPPORTED_AUTH_SCHEME"
    assert "only bearer tokens are supported" in str(error)
    # the scheme's name is case-insensitive
    lower = (("authorization", f"bearer {TOKENS['reader']}"),)
    _stub(channel).ListWindows(pb.ListWindowsRequest(), metadata=lower, timeout=10)


def test_mtls_certificate_with_a_non_bearer_header_is_refused(
    mtls_manager: ThreadedManager, ca: CertificateAuthority
) -> None:
    """A valid certificate does not make an authorization header of another scheme mean
    "no credentials": the header is refused by name, and nothing is stored. Without any
    authorization header the certificate is the identity."""
    writer = ca.client("acme", "writer")
    creds = Credentials(
        root_certificates=ca.pem, certificate_chain=writer.cert, private_key=writer.key
    )
    data_dir = mtls_manager.config.data_dir
    before = chunk_files(data_dir)
    header = build_header("basic-and-cert", CHUNKS, fingerprint=FINGERPRINT, token_ids=IDS)
    basic = (("authorization", "Basic dXNlcjpwYXNz"),)
    with grpc.secure_channel(mtls_manager.target, creds.channel_credentials()) as channel:  # type: ignore[arg-type]
        with pytest.raises(grpc.RpcError) as caught:
            _stub(channel).Freeze(freeze_requests(header, CHUNKS), metadata=basic, timeout=10)
        assert caught.value.code() == Code.UNAUTHENTICATED
        error = from_rpc_error(caught.value)
        assert error.reason == "UNSUPPORTED_AUTH_SCHEME", str(error)
        assert "only bearer tokens are supported" in str(error)
        assert chunk_files(data_dir) == before
        listed = _stub(channel).ListWindows(pb.ListWindowsRequest(), timeout=10)
        assert "basic-and-cert" not in [w.name for w in listed.windows]
        # no authorization header: the certificate's tenant (acme) and role (writer)
        _stub(channel).Freeze(freeze_requests(header, CHUNKS), timeout=10)
        with grpc.secure_channel(
            mtls_manager.target,
            creds.channel_credentials(),  # type: ignore[arg-type]
        ) as again:
            names = [
                w.name
                for w in _stub(again)
                .ListWindows(pb.ListWindowsRequest(), metadata=bearer(TOKENS["admin"]), timeout=10)
                .windows
            ]
        assert "basic-and-cert" in names
        _stub(channel).DeleteWindow(pb.DeleteWindowRequest(name="basic-and-cert"), timeout=10)
