"""The reference engine (HF transformers) behind the agent's `EngineAdapter` contract.

Session id and cache_salt are the same string: that is how clients address a session on
the engine's HTTP endpoint, exactly as with vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cwm_client import pb
from cwm_client.errors import AlreadyExists, InvalidArgument, NotFound
from cwm_server.agent.engines.base import (
    EngineAdapter,
    EngineSession,
    EngineSettings,
    EngineSettingsError,
    ExportedKV,
)
from cwm_server.agent.engines.inputs import EngineInputError
from cwm_server.agent.engines.openai_http import HttpFront
from cwm_server.agent.engines.reference.engine import ReferenceEngine
from cwm_server.agent.engines.reference.sessions import SessionNotFound

TINY_MODEL = "tiny"
"""The model name that stands for the built-in random-weight Llama, built on first use."""
TINY_MODEL_DIR = "tiny-llama"


class ReferenceAdapter(EngineAdapter):
    def __init__(self, engine: ReferenceEngine, http_host: str = "127.0.0.1", http_port: int = 0):
        self.engine = engine
        self._http = HttpFront(engine, http_host, http_port)

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path, http_host: str = "127.0.0.1", http_port: int = 0
    ) -> ReferenceAdapter:
        return cls(ReferenceEngine(model_dir), http_host, http_port)

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> ReferenceAdapter:
        """Run `settings.model` (the tiny Llama when it is None or `tiny`), serving its
        OpenAI-style API on `settings.http_host:http_port`."""
        model = settings.model or TINY_MODEL
        if model == TINY_MODEL:
            if settings.models_dir is None:
                raise EngineSettingsError(
                    "the reference engine needs a model directory (no models_dir to build the "
                    "tiny model in)"
                )
            from cwm_server.agent.engines.reference.tiny_model import ensure_tiny_model

            model = str(ensure_tiny_model(settings.models_dir / TINY_MODEL_DIR))
        return cls.from_model_dir(model, settings.http_host, settings.http_port)

    @property
    def fingerprint(self) -> pb.ModelFingerprint:
        return self.engine.fingerprint

    @property
    def endpoint(self) -> str:
        return self._http.endpoint

    def sessions(self) -> list[EngineSession]:
        return [
            EngineSession(
                session_id=s.cache_salt,
                cache_salt=s.cache_salt,
                token_count=s.num_tokens,
                last_active=s.last_active,
            )
            for s in self.engine.list_sessions()
        ]

    def export_session(self, session_id: str, chunk_tokens: int) -> ExportedKV:
        try:
            token_ids, chunks = self.engine.export_chunks(session_id, chunk_tokens=chunk_tokens)
        except SessionNotFound:
            raise NotFound(
                f"no session {session_id!r} on this engine", reason="SESSION_NOT_FOUND"
            ) from None
        except EngineInputError as exc:
            raise InvalidArgument(str(exc)) from None
        return ExportedKV(token_ids=list(token_ids), chunks=list(chunks))

    def import_session(
        self,
        session_id: str,
        token_ids: Sequence[int],
        chunks: Sequence[bytes],
        chunk_tokens: int,
    ) -> None:
        if any(s.cache_salt == session_id for s in self.engine.list_sessions()):
            raise AlreadyExists(f"the engine already has a session {session_id!r}")
        try:
            self.engine.import_chunks(session_id, list(token_ids), list(chunks), chunk_tokens)
        except EngineInputError as exc:
            raise InvalidArgument(f"the engine refused the window's KV: {exc}") from None

    def close(self) -> None:
        self._http.close()
