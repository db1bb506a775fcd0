"""llama.cpp in the agent's process behind the `EngineAdapter` contract, serving the same
OpenAI-style API as the reference engine (`cache_salt` names the session)."""

from __future__ import annotations

from collections.abc import Sequence

from cwm_client import pb
from cwm_client.chunks import bytes_per_token
from cwm_client.errors import AlreadyExists, InvalidArgument, NotFound
from cwm_server.agent.engines.base import (
    EngineAdapter,
    EngineSession,
    EngineSettings,
    EngineSettingsError,
    ExportedKV,
    chunk_tokens_for,
)
from cwm_server.agent.engines.inputs import EngineInputError
from cwm_server.agent.engines.llamacpp.engine import LlamaCppEngine
from cwm_server.agent.engines.llamacpp.gguf_identity import GgufError
from cwm_server.agent.engines.openai_http import HttpFront

TINY_MODEL = "tiny"
"""The model name that stands for the built-in random-weight GGUF, built on first use."""
TINY_MODEL_FILE = "tiny-llama.gguf"


class LlamaCppAdapter(EngineAdapter):
    def __init__(self, engine: LlamaCppEngine, http_host: str = "127.0.0.1", http_port: int = 0):
        self.engine = engine
        self._http = HttpFront(engine, http_host, http_port)

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> LlamaCppAdapter:
        """Run the GGUF file `settings.model` (`tiny`: the built-in random-weight one)."""
        model = settings.model
        if model is None:
            raise EngineSettingsError("cwm agent --engine llamacpp needs --model FILE.gguf")
        if model == TINY_MODEL:
            if settings.models_dir is None:
                raise EngineSettingsError("no models directory to build the tiny GGUF in")
            from cwm_server.agent.engines.llamacpp.tiny_gguf import ensure_tiny_gguf

            model = str(ensure_tiny_gguf(settings.models_dir / TINY_MODEL_FILE))
        try:
            engine = LlamaCppEngine(model)
        except (OSError, GgufError, EngineInputError) as exc:
            raise EngineSettingsError(f"cannot run {model}: {exc}") from None
        return cls(engine, settings.http_host, settings.http_port)

    @property
    def fingerprint(self) -> pb.ModelFingerprint:
        return self.engine.fingerprint

    @property
    def endpoint(self) -> str:
        return self._http.endpoint

    def default_chunk_tokens(self) -> int:
        return chunk_tokens_for(bytes_per_token(self.engine.fingerprint))

    def sessions(self) -> list[EngineSession]:
        return self.engine.list_sessions()

    def export_session(self, session_id: str, chunk_tokens: int) -> ExportedKV:
        try:
            tokens, chunks = self.engine.export_chunks(session_id, chunk_tokens)
        except KeyError:
            raise NotFound(
                f"no session {session_id!r} on this engine", reason="SESSION_NOT_FOUND"
            ) from None
        except EngineInputError as exc:
            raise InvalidArgument(str(exc)) from None
        return ExportedKV(token_ids=tokens, chunks=chunks)

    def import_session(
        self,
        session_id: str,
        token_ids: Sequence[int],
        chunks: Sequence[bytes],
        chunk_tokens: int,
    ) -> None:
        if self.engine.has_session(session_id):
            raise AlreadyExists(f"the engine already has a session {session_id!r}")
        try:
            self.engine.import_chunks(session_id, token_ids, chunks)
        except EngineInputError as exc:
            raise InvalidArgument(f"the engine refused the window's KV: {exc}") from None

    def close(self) -> None:
        self._http.close()
        self.engine.close()
