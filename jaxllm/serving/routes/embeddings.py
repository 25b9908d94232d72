"""POST /v1/embeddings: vectors from the served model, an encoder (`jaxllm.embeddings.Embedder`) or a decoder
(`LLM.embed`: its pooled final hidden states).

Requests take turns on one worker thread, off the event loop: each computes its whole batch of inputs at once,
and generation (on the engine's own thread) goes on beside it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools

from starlette.requests import Request
from starlette.responses import JSONResponse

from jaxllm.embeddings import embeddings_body
from jaxllm.errors import InvalidRequestError
from jaxllm.serving.protocol import EmbeddingRequest
from jaxllm.serving.routes.common import adapter_of, parse_body

WORKER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxllm-embed")
MAX_INPUTS = 2048  # as OpenAI's API


async def embeddings(request: Request):
    state = request.app.state.server
    req = await parse_body(request, state, EmbeddingRequest)
    inputs = req.inputs()
    if len(inputs) > MAX_INPUTS:
        raise InvalidRequestError(f"input has {len(inputs)} items; send at most {MAX_INPUTS} per request", "input")
    if adapter_of(state, req.model) is not None:
        raise InvalidRequestError(
            "embeddings come from the base model, not a LoRA adapter: name the base model", "model"
        )
    if state.embedder is not None:
        embed = functools.partial(state.embedder.embed, inputs, req.dimensions)
    else:
        embed = functools.partial(state.llm.embed, inputs, req.dimensions, state.pooling)
    result = await asyncio.get_running_loop().run_in_executor(WORKER, embed)
    state.metrics.prompt_tokens.inc(result.prompt_tokens)
    state.metrics.requests.labels("200").inc()
    return JSONResponse(embeddings_body(result, req.model, req.encoding_format))
