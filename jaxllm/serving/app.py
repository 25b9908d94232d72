"""The Starlette app factory: routes, error handlers, API-key check, and the engine's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from jaxllm.api import LLM
from jaxllm.embeddings import Embedder
from jaxllm.engine.async_engine import AsyncEngine
from jaxllm.errors import JaxLLMError
from jaxllm.serving.errors import AuthenticationError, error_body, error_response, status_of
from jaxllm.serving.metrics import Metrics
from jaxllm.serving.response_store import ResponseStore
from jaxllm.serving.routes import chat, completions, embeddings, info, responses, tokenize
from jaxllm.serving.routes.common import ServerState

log = logging.getLogger(__name__)
OPEN_PATHS = ("/health", "/metrics", "/openapi.json")


def create_app(
    llm: LLM | Embedder,
    *,
    served_model_name: str | list[str] | None = None,
    api_key: str | None = None,
    max_body_bytes: int = 4 * 2**20,
    shutdown_timeout: float = 30.0,
    warmup: bool = True,
    warmup_progress: bool = False,
    allowed_origins: list[str] | None = None,
    responses_db: str | None = None,
    pooling: str | None = None,
) -> Starlette:
    """An OpenAI-compatible app serving `llm` (or an encoder `Embedder`, for /v1/embeddings only); the engine
    thread lives as long as the app's lifespan. `warmup`: compile every step shape before /health turns 200
    (with a progress bar on stderr when `warmup_progress`).
    allowed_origins: the browser origins allowed to call the API (CORS; "*" for any; default none).
    responses_db: the SQLite file that keeps stored responses across restarts (default: in memory).
    pooling: how a decoder's embeddings pool its hidden states (default: its folder's config, else last token)."""
    embedder = llm if isinstance(llm, Embedder) else None
    names = served_model_name or [llm.name if embedder else llm.loaded.name]
    state = ServerState(
        None if embedder else llm,
        None,
        [names] if isinstance(names, str) else list(names),
        Metrics(),
        max_body_bytes,
        api_key,
        embedder=embedder,
    )
    state.responses = ResponseStore(responses_db)
    state.pooling = pooling

    def prepare() -> None:
        """Compile every step shape the engine will run, then start the engine thread (off the event loop:
        /health says 503 meanwhile). An embedding model has no engine: it is ready at once."""
        if embedder is not None:
            state.ready = True
            return
        engine = AsyncEngine(llm.engine)
        if warmup:
            engine.engine.reserve(llm.engine.max_num_seqs, llm.max_model_len)
            shapes, seconds = engine.engine.warmup(progress=warmup_progress)
            if not llm.engine.mixed_step:  # separate prefill calls: their shapes are not enumerated; the common ones
                engine.warmup(llm.tokenizer.encode("Hello, warm-up.") or [0])
            state.metrics.warmup_seconds.set(seconds)
            state.metrics.compiled_shapes.set(shapes)
            log.info("compiled %d step shapes in %.1f s before serving", shapes, seconds)
        engine.start()
        state.engine, state.ready = engine, True

    @contextlib.asynccontextmanager
    async def lifespan(app):
        starting = asyncio.create_task(asyncio.to_thread(prepare))
        try:
            yield
        finally:
            state.ready = False
            await starting
            if embedder is None:
                await state.engine.shutdown(shutdown_timeout)
                await asyncio.to_thread(llm.close)  # the leader of a process group lets its followers go
            state.responses.close()

    routes = [
        Route("/v1/chat/completions", chat.chat_completions, methods=["POST"]),
        Route("/v1/completions", completions.completions, methods=["POST"]),
        Route("/v1/responses", responses.create_response, methods=["POST"]),
        Route("/v1/responses/{response_id}", responses.get_response, methods=["GET"]),
        Route("/v1/responses/{response_id}", responses.delete_response, methods=["DELETE"]),
        Route("/v1/embeddings", embeddings.embeddings, methods=["POST"]),
        Route("/v1/models", info.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", info.model, methods=["GET"]),
        Route("/v1/tools", info.tools, methods=["GET"]),
        Route("/tokenize", tokenize.tokenize, methods=["POST"]),
        Route("/detokenize", tokenize.detokenize, methods=["POST"]),
        Route("/tokenizer_info", tokenize.tokenizer_info, methods=["GET"]),
        Route("/health", info.health, methods=["GET"]),
        Route("/metrics", info.metrics, methods=["GET"]),
        Route("/openapi.json", info.openapi, methods=["GET"]),
    ]

    async def on_error(request: Request, exc: Exception):
        status, _ = status_of(exc)
        if status == 500:
            log.exception("unexpected error on %s", request.url.path, exc_info=exc)
        state.metrics.requests.labels(str(status)).inc()
        return error_response(exc)

    async def on_http(request: Request, exc: HTTPException):
        state.metrics.requests.labels(str(exc.status_code)).inc()
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    handlers = {JaxLLMError: on_error, HTTPException: on_http, Exception: on_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.server = state
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key, on_error=on_error)
    if allowed_origins:  # outermost: a preflight is answered before the key is asked for, as browsers expect
        app.add_middleware(
            CORSMiddleware,
            allow_origins=allowed_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "OpenAI-Organization", "OpenAI-Project"],
            max_age=600,
        )
    return app


class APIKeyMiddleware:
    """Pure ASGI check of `Authorization: Bearer <key>` on every route but health, metrics and the spec."""

    def __init__(self, app, api_key: str, on_error):
        self.app, self.key, self.on_error = app, api_key.encode(), on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            request = Request(scope, receive)
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.key):
                error = AuthenticationError("a valid API key is required: send 'Authorization: Bearer <key>'")
                response = await self.on_error(request, error)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
