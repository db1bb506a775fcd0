"""A minimal OpenAI-style HTTP front for the engines that run inside the agent (the reference
engine on HF transformers, llama.cpp through llama-cpp-python): anything with the
`CompletionEngine` shape.

It speaks the subset of vLLM's API that cwm's end-to-end checks and chat clients use, so the
same checks run against both engines: POST /v1/completions and POST /v1/chat/completions
(the model's chat template, or `FALLBACK_CHAT_TEMPLATE` for a model without one), each with
`cache_salt`, a usage block that reports `prompt_tokens_details.cached_tokens`, and
`stream: true` as server-sent events, one event per token as it is sampled
(`stream_options.include_usage` adds the usage event); GET /v1/models and GET /health. `n`
other than 1 is refused (one choice per request). Standard library only
(ThreadingHTTPServer): the engine serialises model calls behind its own lock, so a heavier
server would buy nothing here.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from cwm_server.agent.engines.inputs import EngineInputError


@dataclass(frozen=True)
class GenerationResult:
    """One completion: what was generated and what the session's cache did."""

    token_ids: list[int]
    text: str
    prompt_tokens: int
    cached_tokens: int
    finish_reason: str  # "stop" (an EOS token was sampled) or "length"


class CompletionEngine(Protocol):
    """What the HTTP front needs of an engine: its name and limits, its tokenizer, and
    `generate`, which reuses and extends the session keyed by `cache_salt` (None: no
    session) and raises EngineInputError for what the caller got wrong."""

    @property
    def model_id(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, token_ids: Sequence[int]) -> str: ...

    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> list[int]: ...

    def generate(
        self,
        prompt_token_ids: Sequence[int],
        cache_salt: str | None,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> GenerationResult: ...


MAX_BODY_BYTES = 16 << 20
MAX_TEMPERATURE = 100.0


class RequestError(Exception):
    """A client mistake, answered with `status` and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


def _error_body(status: int, message: str, param: str | None) -> dict[str, Any]:
    kind = {400: "BadRequestError", 404: "NotFoundError", 413: "BadRequestError"}.get(
        status, "InternalServerError"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_completion(engine: CompletionEngine, body: Any, chat: bool = False) -> dict[str, Any]:
    """Validate a /v1/completions (or, with `chat`, /v1/chat/completions) body; every
    failure names the offending field."""
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", "model")
    if model is not None and model != engine.model_id:
        raise RequestError(f"The model `{model}` does not exist.", "model", status=404)

    n = body.get("n", 1)
    if not _is_int(n) or n != 1:
        raise RequestError("only n=1 is supported: one choice per request", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise RequestError("stream_options.include_usage must be a boolean", "stream_options")
    if chat:
        prompt_ids = _chat_prompt(engine, body)
    elif "prompt" not in body:
        raise RequestError("prompt is required", "prompt")
    else:
        prompt_ids = _prompt_ids(engine, body["prompt"])
    return _sampling(engine, body, prompt_ids) | {
        "stream": stream,
        "include_usage": bool(options.get("include_usage", False)),
        "chat": chat,
    }


def _chat_prompt(engine: CompletionEngine, body: dict[str, Any]) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    for position, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise RequestError(
                f"messages[{position}] must be an object with string role and content",
                "messages",
            )
    return engine.chat_prompt([{"role": m["role"], "content": m["content"]} for m in messages])


def _prompt_ids(engine: CompletionEngine, prompt: Any) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt must not be empty", "prompt")
        prompt_ids = engine.tokenize(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompt_ids = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, str | list) for t in prompt):
        raise RequestError("batched prompts are not supported; send one prompt", "prompt")
    else:
        raise RequestError("prompt must be a non-empty string or list of token ids", "prompt")
    return prompt_ids


def _sampling(
    engine: CompletionEngine, body: dict[str, Any], prompt_ids: list[int]
) -> dict[str, Any]:
    max_tokens = body.get("max_tokens", 16)
    limit = engine.max_model_len
    if not _is_int(max_tokens) or not 1 <= max_tokens <= limit:
        raise RequestError(f"max_tokens must be an integer in 1..{limit}", "max_tokens")
    temperature = body.get("temperature", 1.0)
    if (
        not isinstance(temperature, int | float)
        or isinstance(temperature, bool)
        or not math.isfinite(temperature)
        or not 0 <= temperature <= MAX_TEMPERATURE
    ):
        raise RequestError(f"temperature must be a number in 0..{MAX_TEMPERATURE}", "temperature")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise RequestError("seed must be an integer", "seed")
    cache_salt = body.get("cache_salt")
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
        raise RequestError("cache_salt must be a non-empty string", "cache_salt")
    return_token_ids = body.get("return_token_ids", False)
    if not isinstance(return_token_ids, bool):
        raise RequestError("return_token_ids must be a boolean", "return_token_ids")
    return {
        "prompt_ids": prompt_ids,
        "max_tokens": max_tokens,
        "temperature": float(temperature),
        "seed": seed,
        "cache_salt": cache_salt,
        "return_token_ids": return_token_ids,
    }


def _generate(
    engine: CompletionEngine, request: dict[str, Any], on_token: Any = None
) -> GenerationResult:
    try:
        return engine.generate(
            request["prompt_ids"],
            cache_salt=request["cache_salt"],
            max_tokens=request["max_tokens"],
            temperature=request["temperature"],
            seed=request["seed"],
            on_token=on_token,
        )
    except EngineInputError as exc:
        raise RequestError(str(exc), "messages" if request["chat"] else "prompt") from exc


def _usage(result: GenerationResult) -> dict[str, Any]:
    completion_tokens = len(result.token_ids)
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": result.prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
    }


def _completion(engine: CompletionEngine, request: dict[str, Any]) -> dict[str, Any]:
    result = _generate(engine, request)
    choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason}
    if request["chat"]:
        choice["message"] = {"role": "assistant", "content": result.text}
    else:
        choice["text"] = result.text
        choice["logprobs"] = None
    choice["token_ids"] = result.token_ids
    if request["return_token_ids"]:
        choice["prompt_token_ids"] = request["prompt_ids"]
    return {
        "id": f"{'chatcmpl' if request['chat'] else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if request["chat"] else "text_completion",
        "created": int(time.time()),
        "model": engine.model_id,
        "choices": [choice],
        "usage": _usage(result),
    }


class _EventStream:
    """A streamed completion: one server-sent event per token, sent as it is sampled. The
    headers go with the first token, so a request refused before it (a prompt too long)
    still gets an ordinary error response."""

    def __init__(self, handler: _Handler, engine: CompletionEngine, request: dict[str, Any]):
        self._handler = handler
        self._engine = engine
        self._request = request
        self._chat = request["chat"]
        self._id = f"{'chatcmpl' if self._chat else 'cmpl'}-{uuid.uuid4().hex}"
        self._created = int(time.time())
        self._tokens: list[int] = []
        self._text = ""
        self.started = False

    def run(self) -> None:
        result = _generate(self._engine, self._request, on_token=self._token)
        self._start()
        self._event(self._choice("", [], result.finish_reason))
        if self._request["include_usage"]:
            self._event({"choices": [], "usage": _usage(result)})
        self._write(b"data: [DONE]\n\n")

    def _token(self, token: int) -> None:
        self._start()
        self._tokens.append(token)
        shown = [t for t in self._tokens if t not in self._engine.eos_token_ids]
        text = self._engine.detokenize(shown)
        delta, self._text = text[len(self._text) :], text
        self._event(self._choice(delta, [token], None))

    def _choice(self, delta: str, token_ids: list[int], finish: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "token_ids": token_ids}
        if self._chat:
            choice["delta"] = {"content": delta} if finish is None else {}
            if finish is None and len(self._tokens) == 1:
                choice["delta"]["role"] = "assistant"
        else:
            choice["text"] = delta
            choice["logprobs"] = None
        return {"choices": [choice]}

    def _start(self) -> None:
        if self.started:
            return
        self.started = True
        handler = self._handler
        handler.send_response(200, "OK")
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Connection", "close")  # the stream's end is the body's end
        handler.end_headers()
        handler.close_connection = True

    def _event(self, body: dict[str, Any]) -> None:
        event = {
            "id": self._id,
            "object": "chat.completion.chunk" if self._chat else "text_completion",
            "created": self._created,
            "model": self._engine.model_id,
            **body,
        }
        self._write(b"data: " + json.dumps(event).encode() + b"\n\n")

    def _write(self, data: bytes) -> None:
        self._handler.wfile.write(data)
        self._handler.wfile.flush()


def _models(engine: CompletionEngine) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": engine.model_id,
                "object": "model",
                "created": 0,
                "owned_by": "cwm",
                "root": engine.model_id,
                "max_model_len": engine.max_model_len,
            }
        ],
    }


class _Handler(BaseHTTPRequestHandler):
    server: _EngineHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive, so clients can reuse one connection

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the default writes every request to stderr."""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send(200, {"status": "ok"})
        elif path == "/v1/models":
            self._send(200, _models(self.server.engine))
        else:
            self._send(404, _error_body(404, f"no route for GET {path}", None))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        stream: _EventStream | None = None
        try:
            body = self._read_json()
            if path not in ("/v1/completions", "/v1/chat/completions"):
                raise RequestError(f"no route for POST {path}", status=404)
            engine = self.server.engine
            request = _parse_completion(engine, body, chat=path == "/v1/chat/completions")
            if request["stream"]:
                stream = _EventStream(self, engine, request)
                stream.run()
            else:
                self._send(200, _completion(engine, request))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away mid-stream
        except RequestError as exc:
            if stream is not None and stream.started:
                self.close_connection = True  # mid-stream: nothing more can be said
            else:
                self._send(exc.status, _error_body(exc.status, exc.message, exc.param))
        except Exception as exc:  # noqa: BLE001 - a server must answer, not drop the socket
            if stream is not None and stream.started:
                self.close_connection = True
            else:
                self._send(500, _error_body(500, f"internal error: {type(exc).__name__}", None))

    def _read_json(self) -> Any:
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            raise RequestError("Content-Length is required")
        try:
            length = int(length_header)
        except ValueError:
            raise RequestError("Content-Length must be an integer") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            raise RequestError(f"request body exceeds {MAX_BODY_BYTES} bytes", status=413)
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise RequestError(f"request body is not valid JSON: {exc}") from None

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _EngineHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung client must not keep the process alive at exit

    def __init__(self, address: tuple[str, int], engine: CompletionEngine) -> None:
        self.engine = engine
        super().__init__(address, _Handler)


def serve_http(
    engine: CompletionEngine, host: str = "127.0.0.1", port: int = 0
) -> tuple[ThreadingHTTPServer, int]:
    """Serve `engine` over HTTP from a background thread; port 0 picks a free one.

    Returns the server and the port it bound. Stop with `server.shutdown()` then
    `server.server_close()`.
    """
    server = _EngineHTTPServer((host, port), engine)
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},  # shutdown() waits up to one poll interval
        name=f"engine-http-{server.server_address[1]}",
        daemon=True,
    )
    thread.start()
    return server, int(server.server_address[1])


class HttpFront:
    """An engine's API served from a background thread for as long as its adapter lives:
    where clients reach it (`endpoint`), and `close` to stop serving (idempotent)."""

    def __init__(self, engine: CompletionEngine, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server: ThreadingHTTPServer | None
        self._server, bound = serve_http(engine, host, port)
        self.endpoint = f"http://{host}:{bound}"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
