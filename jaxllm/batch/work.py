"""What each request of a batch asks of the engine (`Work`), prepared with the model: prompts tokenized,
max_tokens resolved, params checked against the engine; and how its record is made once it is finished."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from jaxllm.batch.lines import ApiRequest, OwnRequest
from jaxllm.batch.records import own_record, success
from jaxllm.embeddings import embeddings_body
from jaxllm.errors import InvalidRequestError
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import SamplingParams
from jaxllm.serving.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from jaxllm.serving.routes.chat_format import choice_of
from jaxllm.serving.routes.common import chat_inputs, request_id, usage
from jaxllm.serving.routes.completions import completion_inputs, legacy_logprobs

# The record of a finished request from its outputs (one per prompt) and the prompt tokens each found cached.
MakeRecord = Callable[[list[RequestOutput], list[int]], dict]


@dataclasses.dataclass
class Work:
    """The engine requests of one line: a prompt each (token ids), all with the same params, adapter and
    tool-call format."""

    prompts: list[list[int]]
    params: SamplingParams
    record: MakeRecord
    lora: str | None = None
    tool_format: str | None = None

    @property
    def longest(self) -> int:
        """Tokens the longest sequence may reach."""
        return max(len(p) for p in self.prompts) + self.params.max_tokens

    @property
    def sequences(self) -> int:
        return len(self.prompts) * self.params.n


def prepare(item: OwnRequest | ApiRequest, llm) -> Work | dict:
    """The line's `Work`, or at once its record (an embedding line runs here, outside the engine's steps).
    Raises the typed error of a request the model refuses (a prompt beyond the context, say, or any but an
    embedding on an embedding model)."""
    if getattr(llm, "engine", None) is None and not (
        isinstance(item, ApiRequest) and isinstance(item.body, EmbeddingRequest)
    ):
        raise InvalidRequestError(f"{llm.name} is an embedding model: only /v1/embeddings lines run on it")
    if isinstance(item, OwnRequest):
        text = item.prompt if item.prompt is not None else llm.apply_chat_template(item.messages)
        ids = llm.tokenizer.encode(text)
        llm.engine.check_prompt(ids, item.params)
        return Work([ids], item.params, lambda outs, cached: own_record(item.key, outs[0]))
    req = item.body
    if isinstance(req, EmbeddingRequest):
        return success(item.key, _embedding_body(llm, req))
    work = _chat(llm, req) if isinstance(req, ChatCompletionRequest) else _completion(llm, req)
    body = work.record
    return dataclasses.replace(work, record=lambda outs, cached: success(item.key, body(outs, cached)))


def _adapter(llm, model: str) -> str | None:
    """The LoRA adapter a body's `model` names; any other name runs the loaded model."""
    return model if model in llm.lora_names else None


def _chat(llm, req: ChatCompletionRequest) -> Work:
    """As POST /v1/chat/completions prepares a request."""
    ids, params, fmt = chat_inputs(llm, req, [m.as_template_dict() for m in req.messages], req.tools, req.tool_choice)
    llm.engine.check_prompt(ids, params)
    rid, created = request_id("chatcmpl"), int(time.time())

    def body(outs: list[RequestOutput], cached: list[int]) -> dict:
        choices = outs[0].outputs
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "choices": [choice_of(c, req.logprobs) for c in choices],
            "usage": usage(len(ids), sum(len(c.token_ids) for c in choices), cached[0]),
        }

    tools = fmt if req.tools and req.tool_choice != "none" else None  # parse calls out of the output
    return Work([ids], params, body, _adapter(llm, req.model), tools)


def _completion(llm, req: CompletionRequest) -> Work:
    """As POST /v1/completions prepares a request: one engine request per prompt, n choices each."""
    prompts, params = completion_inputs(llm, req)
    echo = [llm.tokenizer.decode(p) if req.echo else "" for p in prompts]
    rid, created = request_id("cmpl"), int(time.time())

    def choice(i: int, out: RequestOutput, c) -> dict:
        scored = (prompts[i], out.prompt_logprobs) if out.prompt_logprobs is not None else None
        lp = legacy_logprobs(llm.tokenizer, c.logprobs, len(echo[i]), scored) if req.logprobs is not None else None
        j = i * params.n + c.index
        return {"index": j, "text": echo[i] + c.text, "logprobs": lp, "finish_reason": c.finish_reason}

    def body(outs: list[RequestOutput], cached: list[int]) -> dict:
        tokens = sum(len(c.token_ids) for out in outs for c in out.outputs)
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "choices": [choice(i, out, c) for i, out in enumerate(outs) for c in out.outputs],
            "usage": usage(sum(len(p) for p in prompts), tokens, sum(cached)),
        }

    return Work(prompts, params, body, _adapter(llm, req.model))


def _embedding_body(llm, req: EmbeddingRequest) -> dict:
    return embeddings_body(llm.embed(req.inputs(), req.dimensions), req.model, req.encoding_format)
