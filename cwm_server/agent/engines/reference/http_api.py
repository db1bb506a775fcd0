"""A minimal OpenAI-style HTTP front for the reference engine.

It speaks the subset of vLLM's API that cwm's end-to-end checks use, so the same checks run
against both engines: POST /v1/completions with `cache_salt` and a usage block that reports
`prompt_tokens_details.cached_tokens`, GET /v1/models and GET /health. Standard library only
(ThreadingHTTPServer): the engine serialises model calls behind its own lock, so a heavier
server would buy nothing here.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cwm_server.agent.engines.reference.engine import ReferenceEngine
from cwm_server.agent.engines.reference.inputs import EngineInputError

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


def _parse_completion(engine: ReferenceEngine, body: Any) -> dict[str, Any]:
    """Validate a /v1/completions body; every failure names the offending field."""
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", "model")
    if model is not None and model != engine.model_id:
        raise RequestError(f"The model `{model}` does not exist.", "model", status=404)

    if "prompt" not in body:
        raise RequestError("prompt is required", "prompt")
    prompt = body["prompt"]
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


def _completion(engine: ReferenceEngine, body: Any) -> dict[str, Any]:
    request = _parse_completion(engine, body)
    try:
        result = engine.generate(
            request["prompt_ids"],
            cache_salt=request["cache_salt"],
            max_tokens=request["max_tokens"],
            temperature=request["temperature"],
            seed=request["seed"],
        )
    except EngineInputError as exc:
        raise RequestError(str(exc), "prompt") from exc
    choice: dict[str, Any] = {
        "index": 0,
        "text": result.text,
        "logprobs": None,
        "finish_reason": result.finish_reason,
        "token_ids": result.token_ids,
    }
    if request["return_token_ids"]:
        choice["prompt_token_ids"] = request["prompt_ids"]
    completion_tokens = len(result.token_ids)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": engine.model_id,
        "choices": [choice],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": result.prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
        },
    }


def _models(engine: ReferenceEngine) -> dict[str, Any]:
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
        try:
            body = self._read_json()
            if path != "/v1/completions":
                raise RequestError(f"no route for POST {path}", status=404)
            self._send(200, _completion(self.server.engine, body))
        except RequestError as exc:
            self._send(exc.status, _error_body(exc.status, exc.message, exc.param))
        except Exception as exc:  # noqa: BLE001 - a server must answer, not drop the socket
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

    def __init__(self, address: tuple[str, int], engine: ReferenceEngine) -> None:
        self.engine = engine
        super().__init__(address, _Handler)


def serve_http(
    engine: ReferenceEngine, host: str = "127.0.0.1", port: int = 0
) -> tuple[ThreadingHTTPServer, int]:
    """Serve `engine` over HTTP from a background thread; port 0 picks a free one.

    Returns the server and the port it bound. Stop with `server.shutdown()` then
    `server.server_close()`.
    """
    server = _EngineHTTPServer((host, port), engine)
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},  # shutdown() waits up to one poll interval
        name=f"reference-http-{server.server_address[1]}",
        daemon=True,
    )
    thread.start()
    return server, int(server.server_address[1])
