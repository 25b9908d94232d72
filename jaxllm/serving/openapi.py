"""The server's OpenAPI description, generated from the pydantic models that validate its requests (so that what
it publishes is what it accepts), with `model` narrowed to the names this server serves."""

from __future__ import annotations

from pydantic import BaseModel

from jaxllm.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from jaxllm.serving.responses_protocol import ResponsesRequest

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_LIST = {"type": "object", "required": ["object", "data"], "properties": {"object": {"const": "list"}}}
_MODEL = {"type": "object", "required": ["id", "object"], "properties": {"id": {"type": "string"}}}

# path -> method -> (summary, request model, 200 body schema, whether it may stream)
_ROUTES: dict[str, dict[str, tuple]] = {
    "/v1/chat/completions": {
        "post": ("Create a chat completion", ChatCompletionRequest, {"type": "object", "required": ["choices"]}, True)
    },
    "/v1/completions": {
        "post": ("Create a text completion", CompletionRequest, {"type": "object", "required": ["choices"]}, True)
    },
    "/v1/embeddings": {"post": ("Create embeddings", EmbeddingRequest, _LIST, False)},
    "/v1/responses": {
        "post": ("Create a response", ResponsesRequest, {"type": "object", "required": ["id", "output"]}, True)
    },
    "/v1/responses/{response_id}": {
        "get": ("A stored response", None, {"type": "object", "required": ["id", "output"]}, False),
        "delete": ("Delete a stored response", None, {"type": "object", "required": ["id", "deleted"]}, False),
    },
    "/v1/models": {"get": ("List the served models", None, _LIST, False)},
    "/v1/models/{model_id}": {"get": ("One served model", None, _MODEL, False)},
    "/v1/tools": {"get": ("The tools the server runs itself", None, _LIST, False)},
    "/tokenize": {"post": ("Token ids of a text", TokenizeRequest, {"type": "object"}, False)},
    "/detokenize": {"post": ("The text of token ids", DetokenizeRequest, {"type": "object"}, False)},
    "/tokenizer_info": {"get": ("The tokenizer's special tokens and chat template", None, {"type": "object"}, False)},
    "/health": {"get": ("200 when ready, 503 while loading or shutting down", None, {"type": "object"}, False)},
    "/metrics": {"get": ("Prometheus metrics", None, None, False)},
}


def openapi_spec(served: list[str] | None = None) -> dict:
    """The OpenAPI 3.1 description; `served`: the names `model` may take (None: any string)."""
    schemas: dict = {"Error": _ERROR}
    paths: dict = {}
    for path, methods in _ROUTES.items():
        paths[path] = {}
        for method, (summary, model, body, streams) in methods.items():
            op = {"summary": summary, "responses": _responses(body, streams)}
            params = [p.strip("{}") for p in path.split("/") if p.startswith("{")]
            if params:
                op["parameters"] = [
                    {"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params
                ]
            if model is not None:
                schemas.update(_schemas(model, served))
                ref = {"$ref": f"#/components/schemas/{model.__name__}"}
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}
            paths[path][method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "jaxllm", "version": "0.1.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _schemas(model: type[BaseModel], served: list[str] | None) -> dict:
    s = model.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = s.pop("$defs", {})
    name = s["properties"].get("model")
    if served and name is not None:
        optional = any(v.get("type") == "null" for v in name.get("anyOf", []))
        kept = {k: v for k, v in name.items() if k in ("title", "default", "description")}
        s["properties"]["model"] = {**kept, "enum": list(served) + ([None] if optional else [])}
    return {**defs, model.__name__: s}


def _responses(body: dict | None, streams: bool) -> dict:
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    if body is None:
        ok = {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
    else:
        content = {"application/json": {"schema": body}}
        if streams:
            content["text/event-stream"] = {}  # server-sent events, one JSON object each
        ok = {"description": "OK", "content": content}
    out = {"200": ok}
    for status, what in [
        ("400", "A malformed request"),
        ("401", "A missing or wrong API key"),
        ("404", "No such model or stored response"),
        ("413", "The body is over the size limit"),
        ("429", "The waiting queue is full"),
        ("503", "Loading or shutting down"),
    ]:
        out[status] = {"description": what, "content": error}
    return out
