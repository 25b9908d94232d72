"""GET /v1/models, /v1/tools, /health, /metrics and /openapi.json."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jaxllm.engine.async_engine import EngineStats
from jaxllm.errors import ModelMismatchError
from jaxllm.serving.errors import error_body
from jaxllm.serving.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

CREATED = int(time.time())


def model_cards(state) -> list[dict]:
    """The served models as OpenAI model objects: the names, then each LoRA adapter (a model on the base)."""
    data = [{"id": name, "object": "model", "created": CREATED, "owned_by": "jaxllm"} for name in state.model_names]
    base = state.model_names[0]
    for name in state.llm.lora_names:
        data.append({"id": name, "object": "model", "created": CREATED, "owned_by": "jaxllm", "parent": base})
    return data


async def models(request: Request):
    return JSONResponse({"object": "list", "data": model_cards(request.app.state.server)})


async def model(request: Request):
    """GET /v1/models/{id}: one served model (or adapter), 404 for any other name."""
    state = request.app.state.server
    name = request.path_params["model_id"]
    for card in model_cards(state):
        if card["id"] == name:
            return JSONResponse(card)
    raise ModelMismatchError(
        f"the model {name!r} does not exist; this server has {state.model_names + state.llm.lora_names}"
    )


async def tools(request: Request):
    """The tools the server runs itself: name, description, parameters schema and source."""
    return JSONResponse({"object": "list", "data": request.app.state.server.llm.tools.describe()})


async def health(request: Request):
    state = request.app.state.server
    if state.ready and state.engine is not None and state.engine.accepting:
        return JSONResponse({"status": "ok"})
    return JSONResponse(error_body("the server is loading or shutting down", "service_unavailable"), status_code=503)


async def metrics(request: Request):
    state = request.app.state.server
    body = state.metrics.render(state.engine.stats if state.engine is not None else EngineStats())
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


def _op(summary: str, schema: str | None = None) -> dict:
    op = {"summary": summary, "responses": {"200": {"description": "OK"}, "4XX": {"description": "Error object"}}}
    if schema:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        }
    return op


def openapi_spec() -> dict:
    """The OpenAPI description of the routes, with request schemas taken from the pydantic models."""
    schemas = {}
    for model in (ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest):
        s = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(s.pop("$defs", {}))
        schemas[model.__name__] = s
    return {
        "openapi": "3.1.0",
        "info": {"title": "jaxllm", "version": "0.1.0"},
        "paths": {
            "/v1/chat/completions": {"post": _op("Create a chat completion", "ChatCompletionRequest")},
            "/v1/completions": {"post": _op("Create a text completion", "CompletionRequest")},
            "/v1/models": {"get": _op("List the served models")},
            "/health": {"get": _op("200 when ready, 503 while loading or shutting down")},
            "/metrics": {"get": _op("Prometheus metrics")},
            "/tokenize": {"post": _op("Token ids of a text", "TokenizeRequest")},
            "/detokenize": {"post": _op("The text of token ids", "DetokenizeRequest")},
            "/tokenizer_info": {"get": _op("The tokenizer's special tokens and chat template")},
        },
        "components": {"schemas": schemas},
    }


async def openapi(request: Request):
    return JSONResponse(openapi_spec())
