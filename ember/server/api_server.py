"""The OpenAI-compatible HTTP app: `build_app(engine, args)` and `serve(engine, args)`.

Two small ASGI middlewares guard every request before any handler runs: the API key (checked
first, so an unauthenticated client cannot make us read a large body) and the body-size limit
(checked against content-length and again while reading, since chunked bodies declare none).
Every error leaves in OpenAI's shape {"error": {"message", "type", "param", "code"}}.
Handlers read their body themselves (so that the checks above come first); `_document_bodies`
puts the pydantic request models into /openapi.json, which clients and the fuzz tests read.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember.engine.interface import EngineStopped
from ember.server.metrics import CONTENT_TYPE, ServerMetrics
from ember.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                   TokenizeRequest, describe_validation_error)
from ember.server.serving_chat import ChatServing, render_messages
from ember.server.serving_common import APIError, ServingContext
from ember.server.serving_completions import CompletionServing
from ember.server.supervisor import EngineSupervisor

if TYPE_CHECKING:   # an EngineClient (ember/engine/process.py) serves the same calls
    from ember.engine.async_engine import AsyncLLMEngine

log = logging.getLogger("ember.server")
STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY_BYTES = 4 << 20


def _opt(args, name: str, default=None):
    return getattr(args, name, default) if args is not None else default


async def _send_error(send, err: APIError) -> None:
    resp = err.response()
    await send({"type": "http.response.start", "status": resp.status_code,
                "headers": resp.raw_headers})
    await send({"type": "http.response.body", "body": resp.body})


class APIKeyMiddleware:
    def __init__(self, app, api_key: str, open_paths: set[str]) -> None:
        self.app, self.key, self.open_paths = app, api_key.encode(), open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        token = given[7:].strip() if given[:7].lower() == b"bearer " else b""
        if not hmac.compare_digest(token, self.key):   # constant time in the key's content
            return await _send_error(send, APIError(
                401, "Incorrect or missing API key; send 'Authorization: Bearer <key>'.",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    # An oversized body is still drained (up to this multiple of the limit) before the 413, so
    # that the client, still writing, reads our answer instead of a reset connection.
    DRAIN_FACTOR = 4

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            size += len(msg.get("body", b""))
            too_large = too_large or size > self.max_bytes
            if not too_large:
                chunks.append(msg.get("body", b""))
            if not msg.get("more_body") or size > self.DRAIN_FACTOR * self.max_bytes:
                break
        if too_large:
            return await _send_error(send, APIError(
                413, f"the request body is larger than the limit of {self.max_bytes} bytes",
                code="request_too_large"))
        body, replayed = b"".join(chunks), False

        async def replay():
            # The body once, then the real channel: handlers watch it for the disconnect.
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# A \uD800-\uDFFF escape in the body; only then can the parsed text hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(data) -> bool:
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


async def _parse(raw: Request, model_cls):
    body = await raw.body()
    try:
        # Strict UTF-8 (json.loads on bytes would let surrogates through) and strict JSON (NaN
        # and Infinity are not numbers a client may send).
        data = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except ValueError as e:                  # includes bad UTF-8
        raise APIError(400, f"malformed JSON body: {e}") from None
    except RecursionError:
        raise APIError(400, "malformed JSON body: nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(body) and _has_lone_surrogate(data):
        raise APIError(400, "malformed JSON body: a \\u escape encodes a lone UTF-16 surrogate, "
                       "which is not a Unicode character")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        message, param = describe_validation_error(e)
        raise APIError(400, message, param=param) from None


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)   # FastAPI's 422 becomes OpenAI's 400
    async def validation_error(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"msg": str(exc), "loc": ()}
        return APIError(400, f"invalid request: {first['msg']}").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def internal_error(_, exc: Exception):
        log.exception("unhandled error")
        return APIError(500, f"internal server error: {exc!r}").response()


def _document_bodies(app: FastAPI, bodies: dict[str, type[BaseModel]]) -> None:
    """/openapi.json with each POST route's request body: the pydantic model's JSON schema."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for path, model in bodies.items():
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
                schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def inspect_engine(eng) -> dict:
    """The allocator and request bookkeeping, checked; runs on the engine thread."""
    kv, pc = eng.kv, eng.kv.prefix_cache
    try:
        kv.check_integrity()
        integrity = "ok"
    except AssertionError as e:
        integrity = f"broken: {e}"
    return {"integrity": integrity, "requests": len(eng.states),
            "running": len(eng.scheduler.running), "waiting": len(eng.scheduler.waiting),
            "block_tables": len(kv.tables),
            "kv_blocks": {"total": kv.num_blocks, "free": kv.pool.num_free,
                          "cached": pc.num_evictable if pc else 0,
                          "held": sum(1 for c in kv.pool.ref_count if c > 0)}}


def build_app(engine: AsyncLLMEngine, args=None) -> FastAPI:
    """args: any object with the `ember serve` options (argparse.Namespace); None = defaults."""
    names = [_opt(args, "served_model_name") or engine.model_name]
    metrics = ServerMetrics(engine, names[0])
    ctx = ServingContext(engine, metrics, names, _opt(args, "max_waiting"))
    completions, chat = CompletionServing(ctx), ChatServing(ctx)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        engine.shutdown()                    # aborts whatever is still in flight

    app = FastAPI(title="ember", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.metrics = engine, metrics
    _install_error_handlers(app)

    @app.get("/health")
    async def health():
        return Response(status_code=200 if engine.healthy else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": created, "owned_by": "ember",
             "root": str(engine.model_name), "max_model_len": engine.max_model_len}
            for n in names]}

    @app.post("/v1/completions")
    async def create_completion(raw: Request):
        return await completions.create(await _parse(raw, CompletionRequest), raw)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(raw: Request):
        return await chat.create(await _parse(raw, ChatCompletionRequest), raw)

    @app.post("/tokenize")
    async def tokenize(raw: Request):
        req = await _parse(raw, TokenizeRequest)
        ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        try:
            ids = (ctx.tokenizer.encode(req.prompt, req.add_special_tokens) if req.prompt is not None
                   else render_messages(ctx.tokenizer, req.messages, req.add_generation_prompt))
        except ValueError as e:
            raise APIError.bad_request(e) from None
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(raw: Request):
        req = await _parse(raw, DetokenizeRequest)
        ctx.check_model(req.model)
        vocab = engine.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": ctx.tokenizer.decode(req.tokens, False)}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/")
    async def chat_page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    if _opt(args, "debug_endpoints"):
        @app.get("/debug/engine")
        async def debug_engine():
            try:
                return {"healthy": engine.healthy, **await engine.call(inspect_engine)}
            except EngineStopped as e:
                raise APIError(503, str(e), headers={"Retry-After": "5"}) from None

    _document_bodies(app, {"/v1/completions": CompletionRequest,
                           "/v1/chat/completions": ChatCompletionRequest,
                           "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest})

    app.add_middleware(BodyLimitMiddleware,
                       max_bytes=_opt(args, "max_body_bytes") or DEFAULT_MAX_BODY_BYTES)
    if _opt(args, "api_key"):
        open_paths = {"/health", "/"} | ({"/metrics"} if _opt(args, "metrics_public") else set())
        app.add_middleware(APIKeyMiddleware, api_key=args.api_key, open_paths=open_paths)
    return app


def serve(engine: AsyncLLMEngine, args) -> int:
    """Run until SIGINT/SIGTERM (exit status 0) or, with `--on-engine-failure exit`, until the
    engine dies (EXIT_ENGINE_FAILED). Shutdown: uvicorn stops accepting at once; in-flight
    responses get `shutdown_timeout` seconds to finish, then we abort them at the engine, so that
    streams end with an error event rather than by task cancellation; then the engine thread
    stops."""
    grace = _opt(args, "shutdown_timeout", 5.0)
    exit_status = 0

    class Server(uvicorn.Server):
        supervisor: asyncio.Task | None = None

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                watch = EngineSupervisor(engine, _opt(args, "on_engine_failure", "restart"),
                                         _opt(args, "max_engine_restarts", 5), self.stop_with)
                self.supervisor = asyncio.ensure_future(watch.run())
                print(f"ember: serving {engine.model_name} on "
                      f"http://{args.host}:{args.port} (ready)", flush=True)

        def stop_with(self, status: int) -> None:
            nonlocal exit_status
            exit_status, self.should_exit = status, True

        async def shutdown(self, sockets=None) -> None:
            if self.supervisor is not None:
                self.supervisor.cancel()
            asyncio.get_running_loop().call_later(grace, engine.abort_all)
            await super().shutdown(sockets)

    config = uvicorn.Config(build_app(engine, args), host=args.host, port=args.port,
                            log_level=_opt(args, "log_level", "warning"),
                            timeout_graceful_shutdown=grace + 5.0)   # a backstop only
    # uvicorn re-raises the signal that stopped it once it is done; by then shutdown was
    # graceful, so let that be a clean exit (status 0) rather than death by signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    Server(config).run()
    if exit_status:
        log.error("ember: exiting with status %d: the engine failed", exit_status)
    return exit_status
