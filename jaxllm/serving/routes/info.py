"""GET /v1/models, /v1/models/{id}, /v1/tools, /health, /metrics and /openapi.json."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from jaxllm.engine.async_engine import EngineStats
from jaxllm.errors import ModelMismatchError
from jaxllm.serving.errors import error_body
from jaxllm.serving.openapi import openapi_spec

CREATED = int(time.time())


def model_cards(state) -> list[dict]:
    """The served models as OpenAI model objects: the names, then each LoRA adapter (a model on the base)."""
    data = [{"id": name, "object": "model", "created": CREATED, "owned_by": "jaxllm"} for name in state.model_names]
    base = state.model_names[0]
    for name in state.served[len(state.model_names) :]:
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
    raise ModelMismatchError(f"the model {name!r} does not exist; this server has {state.served}")


async def tools(request: Request):
    """The tools the server runs itself: name, description, parameters schema and source."""
    llm = request.app.state.server.llm
    return JSONResponse({"object": "list", "data": llm.tools.describe() if llm is not None else []})


async def health(request: Request):
    state = request.app.state.server
    if state.accepting:
        return JSONResponse({"status": "ok"})
    return JSONResponse(error_body("the server is loading or shutting down", "service_unavailable"), status_code=503)


async def metrics(request: Request):
    state = request.app.state.server
    body = state.metrics.render(state.engine.stats if state.engine is not None else EngineStats())
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


async def openapi(request: Request):
    return JSONResponse(openapi_spec(request.app.state.server.served))
