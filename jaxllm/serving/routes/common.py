"""What the chat and completion routes share: body parsing, limits, streaming with metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from jaxllm.api import LLM
from jaxllm.engine.async_engine import AsyncEngine, StreamOutput
from jaxllm.errors import ContextLengthError, EngineShutdownError, InvalidRequestError, ModelMismatchError
from jaxllm.sampling_params import SamplingParams
from jaxllm.serving.errors import BodyTooLargeError, status_of
from jaxllm.serving.metrics import Metrics
from jaxllm.serving.protocol import DetokenizeRequest, EmbeddingRequest, TokenizeRequest
from jaxllm.serving.response_store import ResponseStore
from jaxllm.structured import tool_choice
from jaxllm.structured.tool_calls import format_for

if TYPE_CHECKING:
    from jaxllm.embeddings import Embedder

log = logging.getLogger(__name__)
_ANY_MODEL = (TokenizeRequest, DetokenizeRequest)  # the routes an embedding model serves beside embeddings


@dataclasses.dataclass
class ServerState:
    llm: LLM | None
    engine: AsyncEngine | None
    model_names: list[str]
    metrics: Metrics
    max_body_bytes: int
    api_key: str | None = None
    ready: bool = False
    responses: ResponseStore | None = None  # stored responses (the Responses API)
    embedder: Embedder | None = None  # an encoder served for embeddings only (then `llm` is None)
    pooling: str | None = None  # a decoder's embedding pooling (None: its folder's config, else the last token)

    @property
    def served(self) -> list[str]:
        """The names requests may give as `model`: the served names, then the LoRA adapters."""
        return self.model_names + (self.llm.lora_names if self.llm is not None else [])

    @property
    def model(self):
        """The served model: the `LLM`, or the `Embedder` (both give `tokenizer` and `max_model_len`)."""
        return self.embedder or self.llm

    @property
    def accepting(self) -> bool:
        """Ready for requests: loaded (and compiled), and not shutting down."""
        if self.embedder is not None:
            return self.ready
        return self.ready and self.engine is not None and self.engine.accepting


async def parse_body(request: Request, state: ServerState, model: type[BaseModel]):
    """The request body validated into `model`; errors name the offending field."""
    if not state.accepting:
        raise EngineShutdownError("the server is loading or shutting down: retry shortly")
    if state.embedder is not None and model is not EmbeddingRequest and model not in _ANY_MODEL:
        raise InvalidRequestError(
            f"the model {state.model_names[0]!r} is an embedding model: it serves /v1/embeddings only"
        )
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > state.max_body_bytes:
        raise BodyTooLargeError(f"the request body is over the {state.max_body_bytes}-byte limit")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > state.max_body_bytes:
            raise BodyTooLargeError(f"the request body is over the {state.max_body_bytes}-byte limit")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    try:  # strict: no coercion the published schema does not allow (false as 0, "1" as 1)
        req = model.model_validate_json(body, strict=True)
    except ValidationError as e:
        raise InvalidRequestError(*described(e.errors())) from None
    served = state.served
    if req.model is not None and req.model not in served:  # (optional only for the tokenizer routes)
        raise ModelMismatchError(f"the model {req.model!r} does not exist; this server has {served}", param="model")
    return req


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "literal", "json-or-python"}


def described(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) of a validation failure: its most specific error (a union's members each report one;
    the member's name is not part of the field's path). A bad key of an object names the object and the key."""

    def path(err) -> list[str]:
        return [
            str(p)
            for p in err["loc"]
            if isinstance(p, int)
            or p == "[key]"
            or not (p in _TYPE_TAGS or "[" in p or p[:1].isupper() or p.startswith("function-"))
        ]

    err = max(errors, key=lambda e: len(path(e)))
    loc = path(err)
    if loc and loc[-1] == "[key]":
        param = ".".join(loc[:-2]) or None
        return f"{param}: key {loc[-2]!r}: {err['msg']}", param
    param = ".".join(loc) or None
    return f"{param}: {err['msg']}", param


def adapter_of(state: ServerState, model: str | None) -> str | None:
    """The LoRA adapter a request's `model` names (None: the base model)."""
    return model if model is not None and model not in state.model_names else None


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int, param: str, least: int = 1) -> int:
    """max_tokens, defaulting to what fits; a prompt plus max_tokens beyond the context is an error, as is
    fewer than `least` (0 where a request may only score its prompt)."""
    if requested is None:
        requested = max_model_len - prompt_len
    if requested < least:
        raise InvalidRequestError(f"{param} must be >= {least}, got {requested}", param=param)
    if prompt_len + requested > max_model_len:
        raise ContextLengthError(
            f"this model's context is {max_model_len} tokens, but the prompt has {prompt_len} and {param} asks "
            f"for {requested}: shorten the prompt or lower {param}",
            param=param,
        )
    return requested


def chat_inputs(llm: LLM, req, messages: list[dict], tools, choice) -> tuple[list[int], SamplingParams, str]:
    """What a chat request gives the engine: the prompt's token ids (`messages` rendered with `tools`), its
    params (max_tokens resolved against the context, a forced tool `choice` as a grammar) and the model's
    tool-call format. req: the `ChatCompletionRequest`."""
    ids = llm.tokenizer.encode(llm.apply_chat_template(messages, tools=tools), add_special_tokens=False)
    use_new = req.max_completion_tokens is not None
    param = "max_completion_tokens" if use_new else "max_tokens"
    requested = req.max_completion_tokens if use_new else req.max_tokens
    max_tokens = resolve_max_tokens(requested, len(ids), llm.max_model_len, param)
    params = req.sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
    fmt = format_for(llm.tokenizer.chat_template)
    return ids, tool_choice.forced(params, fmt, choice, tools, req.parallel_tool_calls), fmt


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens served from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


async def tracked(state: ServerState, stream: AsyncIterator[StreamOutput], start: float):
    """Pass outputs through, recording time to first token, inter-token latency and token counts."""
    last = None
    async for out in stream:
        now = time.monotonic()
        n = len(out.token_ids)
        if n:
            if last is None:
                state.metrics.ttft.observe(now - start)
                for _ in range(n - 1):
                    state.metrics.itl.observe(0.0)
            else:
                for _ in range(n):
                    state.metrics.itl.observe((now - last) / n)
            last = now
            state.metrics.generated_tokens.inc(n)
        yield out


async def merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Interleave several async streams as (stream index, item); errors propagate."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, s):
        try:
            async for item in s:
                await queue.put((i, item))
        except BaseException as e:  # noqa: BLE001 — handed to the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    open_streams = len(streams)
    try:
        while open_streams:
            i, item = await queue.get()
            if item is done:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            await s.aclose()


async def chained(first, rest: AsyncIterator):
    """`first` (unless None), then the rest: the stream `first_and_rest` took apart, whole again."""
    if first is not None:
        yield first
    async for item in rest:
        yield item


def stream_failure(state: ServerState, e: Exception, what: str) -> tuple[str, str, str | None]:
    """An error raised once a stream had begun (`what` names the stream in the log), counted by status and
    logged when unexpected: (message, OpenAI error type, param) for the stream's error event."""
    status, err_type = status_of(e)
    if status == 500:
        log.exception("%s failed", what)
    state.metrics.requests.labels(str(status)).inc()
    return ("internal server error" if status == 500 else str(e)), err_type, getattr(e, "param", None)


async def first_and_rest(stream: AsyncIterator):
    """Await the first item (so errors surface before any response is sent); return it and the stream."""
    it = stream.__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        first = None
    return first, it
