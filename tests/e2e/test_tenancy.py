"""Tenancy: another tenant's windows, chunks, agents and sessions are indistinguishable from
absent ones.

Two tenants share one real manager. The attacker (alice) runs every probe twice: once before
the victim (bob) has anything, and once after bob connected an agent with a live session and
froze a window under the very names alice probes. Each probe must fail (or answer) exactly
alike both times: the same status code, the same message, the same error details. Bob's data
must be unchanged afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence

import grpc
import pytest
from google.protobuf.message import Message

from cwm_client import Credentials, SessionClient, WindowClient, pb
from cwm_client._common import build_header, freeze_requests
from cwm_client.errors import from_rpc_error
from cwm_server.agent.engines.base import EngineAdapter, EngineSession, ExportedKV
from cwm_server.agent.host_agent import HostAgent
from cwm_server.manager.config import ManagerConfig, ServerOptions
from cwm_server.manager.rpc import auth
from tests.helpers import (
    FINGERPRINT,
    ThreadedAgent,
    ThreadedManager,
    synthetic_chunks,
    token_ids,
)

TOKENS = {
    (tenant, role): auth.mint_token()
    for tenant in ("alice", "bob")
    for role in ("writer", "agent", "reader")
}
BOB_CHUNKS = synthetic_chunks(600, seed=11)
BOB_IDS = token_ids(600, seed=11)
ALICE_CHUNKS = synthetic_chunks(300, seed=12)
ALICE_IDS = token_ids(300, seed=12)
SECRET = "secret-window"
BOB_SESSION = "bob-session"
BOB_AGENT = "bob-agent"


class FakeEngine(EngineAdapter):
    """An in-memory engine holding synthetic KV: enough for an agent to freeze and thaw."""

    def __init__(self, sessions: dict[str, tuple[list[int], list[bytes]]]) -> None:
        self._sessions = dict(sessions)
        self._lock = threading.Lock()

    @property
    def fingerprint(self) -> pb.ModelFingerprint:
        return FINGERPRINT

    @property
    def endpoint(self) -> str:
        return "http://fake.invalid"

    def sessions(self) -> list[EngineSession]:
        with self._lock:
            return [
                EngineSession(sid, sid, len(ids), 0.0) for sid, (ids, _) in self._sessions.items()
            ]

    def export_session(self, session_id: str, chunk_tokens: int) -> ExportedKV:
        with self._lock:
            ids, datas = self._sessions[session_id]
        return ExportedKV(list(ids), list(datas))

    def import_session(
        self,
        session_id: str,
        token_ids: Sequence[int],
        chunks: Sequence[bytes],
        chunk_tokens: int,
    ) -> None:
        with self._lock:
            self._sessions[session_id] = (list(token_ids), list(chunks))


def bearer(tenant: str, role: str = "writer") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[tenant, role]}"),)


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedManager]:
    root = tmp_path_factory.mktemp("tenancy")
    path = root / "auth.toml"
    path.write_text(
        "\n".join(auth.token_line(tok, tenant, role) for (tenant, role), tok in TOKENS.items())
    )
    running = ThreadedManager(
        ManagerConfig(data_dir=root / "data", listen="127.0.0.1:0", fsync=False),
        ServerOptions(auth_file=path),
    )
    yield running
    running.stop()


def start_agent(
    manager: ThreadedManager, tenant: str, agent_id: str, engine: FakeEngine
) -> ThreadedAgent:
    agent = ThreadedAgent(
        HostAgent(
            engine,
            manager.target,
            agent_id,
            report_interval=0.05,
            credentials=Credentials(token=TOKENS[tenant, "agent"]),
        )
    )
    agent.wait_connected()
    return agent


def wait_for_session(target: str, tenant: str, session_id: str) -> None:
    with SessionClient(target, token=TOKENS[tenant, "reader"]) as sessions:
        deadline = time.monotonic() + 20
        while session_id not in {s.session_id for s in sessions.list_sessions()}:
            assert time.monotonic() < deadline, f"{session_id} never reported"
            time.sleep(0.05)


Outcome = tuple[str, object]


def outcome(call: Callable[[], object]) -> Outcome:
    """What a probe observed: its answer, or its error's code, message, reason, field and
    metadata (everything a client can see)."""
    try:
        result = call()
        if isinstance(result, Iterator):
            result = list(result)
    except grpc.RpcError as rpc_error:
        exc = from_rpc_error(rpc_error)
        return (
            "error",
            (exc.code, exc.message, exc.reason, exc.field, sorted(exc.metadata.items())),
        )
    messages = result if isinstance(result, list) else [result]
    return ("ok", [_timeless(m) for m in messages])


def _timeless(message: Message) -> bytes:
    """The message without its timestamps (a window frozen twice differs only in those)."""
    copy = type(message)()
    copy.CopyFrom(message)
    stack = [copy]
    while stack:
        current = stack.pop()
        for field, value in current.ListFields():
            if field.message_type is not None and field.message_type.full_name == (
                "google.protobuf.Timestamp"
            ):
                current.ClearField(field.name)
            elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
                stack.extend(value if field.is_repeated else [value])
    return copy.SerializeToString(deterministic=True)


def probes(channel: grpc.Channel) -> dict[str, Callable[[], object]]:
    """Everything alice can try against bob's names, agents, sessions and chunks."""
    windows = pb.WindowServiceStub(channel)
    sessions = pb.SessionServiceStub(channel)
    alice = bearer("alice")
    bob_digests = [c.digest for c in BOB_CHUNKS]
    steal_header = build_header("stolen", BOB_CHUNKS, fingerprint=FINGERPRINT, token_ids=BOB_IDS)
    return {
        "list": lambda: windows.ListWindows(pb.ListWindowsRequest(), metadata=alice),
        "list-prefix": lambda: windows.ListWindows(
            pb.ListWindowsRequest(name_prefix="secret"), metadata=alice
        ),
        "list-session": lambda: windows.ListWindows(
            pb.ListWindowsRequest(session_id=BOB_SESSION), metadata=alice
        ),
        "get": lambda: windows.GetWindow(pb.GetWindowRequest(name=SECRET), metadata=alice),
        "thaw": lambda: windows.Thaw(pb.ThawRequest(name=SECRET), metadata=alice),
        "clone-from": lambda: windows.CloneWindow(
            pb.CloneWindowRequest(source_name=SECRET, new_name="stolen"), metadata=alice
        ),
        "delete": lambda: windows.DeleteWindow(pb.DeleteWindowRequest(name=SECRET), metadata=alice),
        "find-missing": lambda: windows.FindMissingChunks(
            pb.FindMissingChunksRequest(digests=bob_digests), metadata=alice
        ),
        # claim bob's chunks by digest without sending them: dedup must not lend them
        "freeze-by-digest": lambda: windows.Freeze(
            iter([pb.FreezeRequest(header=steal_header)]), metadata=alice
        ),
        "freeze-parent": lambda: windows.Freeze(
            freeze_requests(
                build_header(
                    "child",
                    ALICE_CHUNKS,
                    fingerprint=FINGERPRINT,
                    token_ids=ALICE_IDS,
                    parent=SECRET,
                ),
                ALICE_CHUNKS,
            ),
            metadata=alice,
        ),
        "list-agents": lambda: sessions.ListAgents(pb.ListAgentsRequest(), metadata=alice),
        "list-sessions": lambda: sessions.ListSessions(pb.ListSessionsRequest(), metadata=alice),
        "list-sessions-of-agent": lambda: sessions.ListSessions(
            pb.ListSessionsRequest(agent_id=BOB_AGENT), metadata=alice
        ),
        "freeze-session": lambda: sessions.FreezeSession(
            pb.FreezeSessionRequest(session_id=BOB_SESSION, window_name="grab"), metadata=alice
        ),
        "freeze-session-on-agent": lambda: sessions.FreezeSession(
            pb.FreezeSessionRequest(session_id=BOB_SESSION, window_name="grab", agent_id=BOB_AGENT),
            metadata=alice,
        ),
        "thaw-window": lambda: sessions.ThawWindow(
            pb.ThawWindowRequest(window_name=SECRET), metadata=alice
        ),
        "thaw-own-window-into-bobs-agent": lambda: sessions.ThawWindow(
            pb.ThawWindowRequest(window_name="alice-own", agent_id=BOB_AGENT), metadata=alice
        ),
    }


def cleanup_alice(channel: grpc.Channel) -> None:
    """Undo what a probe legitimately created in alice's own namespace (a child window)."""
    windows = pb.WindowServiceStub(channel)
    for name in ("child", "stolen"):
        try:
            windows.DeleteWindow(pb.DeleteWindowRequest(name=name), metadata=bearer("alice"))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND


def test_another_tenant_is_indistinguishable_from_nothing(manager: ThreadedManager) -> None:
    alice_engine = FakeEngine({"alice-session": (ALICE_IDS, [c.raw for c in ALICE_CHUNKS])})
    alice_agent = start_agent(manager, "alice", "alice-agent", alice_engine)
    bob_agent: ThreadedAgent | None = None
    try:
        with grpc.insecure_channel(manager.target) as channel:
            with WindowClient(manager.target, token=TOKENS["alice", "writer"]) as alice:
                alice.freeze(
                    "alice-own", ALICE_CHUNKS, fingerprint=FINGERPRINT, token_ids=ALICE_IDS
                )
            wait_for_session(manager.target, "alice", "alice-session")

            before = {}
            for name, probe in probes(channel).items():
                before[name] = outcome(probe)
                cleanup_alice(channel)

            # bob arrives: an agent with a live session, frozen into SECRET by order
            bob_engine = FakeEngine({BOB_SESSION: (BOB_IDS, [c.raw for c in BOB_CHUNKS])})
            bob_agent = start_agent(manager, "bob", BOB_AGENT, bob_engine)
            wait_for_session(manager.target, "bob", BOB_SESSION)
            with SessionClient(manager.target, token=TOKENS["bob", "writer"]) as bob_sessions:
                frozen = bob_sessions.freeze_session(BOB_SESSION, SECRET)
            assert frozen.agent_id == BOB_AGENT
            with WindowClient(manager.target, token=TOKENS["bob", "writer"]) as bob:
                bob_window = bob.get(SECRET)
                assert bob_window.session_id == BOB_SESSION
                assert list(bob.find_missing([c.digest for c in BOB_CHUNKS])) == []

            after = {}
            for name, probe in probes(channel).items():
                after[name] = outcome(probe)
                cleanup_alice(channel)

            for name in before:
                assert after[name] == before[name], f"probe {name!r} tells bob's data apart"
            # the probes that touch bob's names failed as absent ones do
            assert before["get"][0] == "error"
            assert before["get"][1][0] == grpc.StatusCode.NOT_FOUND  # type: ignore[index]
            assert before["freeze-session"][1][0] == grpc.StatusCode.NOT_FOUND  # type: ignore[index]
            assert before["list-sessions-of-agent"][1][0] == grpc.StatusCode.NOT_FOUND  # type: ignore[index]
            # alice's own agent and window still work for her
            with SessionClient(manager.target, token=TOKENS["alice", "reader"]) as alice_sessions:
                assert [a.agent_id for a in alice_sessions.list_agents()] == ["alice-agent"]

            # bob's data is unchanged, byte for byte
            with WindowClient(manager.target, token=TOKENS["bob", "reader"]) as bob:
                assert bob.get(SECRET) == bob_window
                assert [w.name for w in bob.list()] == [SECRET]
                with bob.thaw(SECRET) as stream:
                    assert [c.data for c in stream] == [c.raw for c in BOB_CHUNKS]
            with SessionClient(manager.target, token=TOKENS["bob", "reader"]) as bob_sessions:
                assert [a.agent_id for a in bob_sessions.list_agents()] == [BOB_AGENT]
                assert [s.session_id for s in bob_sessions.list_sessions()] == [BOB_SESSION]
    finally:
        if bob_agent is not None:
            bob_agent.stop()
        alice_agent.stop()


def test_names_and_agent_ids_are_per_tenant(manager: ThreadedManager) -> None:
    """Both tenants use the same window name and agent id without touching each other."""
    engines = {
        t: FakeEngine({f"{t}-s": (ALICE_IDS, [c.raw for c in ALICE_CHUNKS])})
        for t in ("alice", "bob")
    }
    agents = {t: start_agent(manager, t, "same-agent", engines[t]) for t in ("alice", "bob")}
    try:
        for tenant in ("alice", "bob"):
            wait_for_session(manager.target, tenant, f"{tenant}-s")
        for tenant in ("alice", "bob"):
            with SessionClient(manager.target, token=TOKENS[tenant, "writer"]) as sessions:
                assert [s.session_id for s in sessions.list_sessions("same-agent")] == [
                    f"{tenant}-s"
                ]
                sessions.freeze_session(f"{tenant}-s", "same-name")
                # thawing through an agent makes a new session whose cache_salt is 256 random
                # bits, shown to this tenant only
                thawed = sessions.thaw_window("same-name")
                assert thawed.agent_id == "same-agent"
                assert len(thawed.cache_salt) == 64 and int(thawed.cache_salt, 16) >= 0
                assert thawed.session_id == thawed.cache_salt
        with SessionClient(manager.target, token=TOKENS["alice", "reader"]) as alice_sessions:
            salts = {s.cache_salt for s in alice_sessions.list_sessions()}
        with SessionClient(manager.target, token=TOKENS["bob", "reader"]) as bob_sessions:
            bob_salts = {s.cache_salt for s in bob_sessions.list_sessions()}
        assert salts and bob_salts and not salts & bob_salts
        for tenant, own in (("alice", "alice-s"), ("bob", "bob-s")):
            with WindowClient(manager.target, token=TOKENS[tenant, "writer"]) as client:
                assert client.get("same-name").session_id == own
                client.delete("same-name")
    finally:
        for agent in agents.values():
            agent.stop()


def test_dedup_stays_within_a_tenant(manager: ThreadedManager) -> None:
    """FindMissingChunks answers from the caller's tenant only; identical bytes frozen by two
    tenants are stored for each, and deleting one tenant's copy leaves the other's intact."""
    chunks = synthetic_chunks(256, seed=99)
    ids = token_ids(256, seed=99)
    digests = [c.digest for c in chunks]
    with (
        WindowClient(manager.target, token=TOKENS["alice", "writer"]) as alice,
        WindowClient(manager.target, token=TOKENS["bob", "writer"]) as bob,
    ):
        first = bob.freeze("dedup", chunks, fingerprint=FINGERPRINT, token_ids=ids)
        assert first.chunks_sent == 1
        assert bob.find_missing(digests) == []
        assert alice.find_missing(digests) == digests  # bob's chunk is absent for alice
        second = alice.freeze("dedup", chunks, fingerprint=FINGERPRINT, token_ids=ids)
        assert (second.chunks_sent, second.chunks_reused) == (1, 0)  # sent again, not lent
        bob.delete("dedup")
        assert bob.find_missing(digests) == digests
        with alice.thaw("dedup") as stream:
            assert [c.data for c in stream] == [chunks[0].raw]
        alice.delete("dedup")


def test_concurrent_calls_keep_their_own_tenant(manager: ThreadedManager) -> None:
    """The caller is per call: interleaved streams of two tenants never see each other's."""
    content = {"alice": synthetic_chunks(300, seed=21), "bob": synthetic_chunks(300, seed=22)}
    ids = token_ids(300, seed=21)
    for tenant, chunks in content.items():
        with WindowClient(manager.target, token=TOKENS[tenant, "writer"]) as client:
            client.freeze("mine", chunks, fingerprint=FINGERPRINT, token_ids=ids)
    listed = {}
    for tenant in content:
        with WindowClient(manager.target, token=TOKENS[tenant, "reader"]) as client:
            listed[tenant] = [w.name for w in client.list()]
    errors: list[BaseException] = []

    def worker(tenant: str) -> None:
        try:
            with WindowClient(manager.target, token=TOKENS[tenant, "reader"]) as client:
                for _ in range(15):
                    with client.thaw("mine") as stream:
                        got = [c.data for c in stream]
                    assert got == [c.raw for c in content[tenant]], tenant
                    assert [w.name for w in client.list()] == listed[tenant]
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in ("alice", "bob") * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for tenant in content:
        with WindowClient(manager.target, token=TOKENS[tenant, "writer"]) as client:
            client.delete("mine")
