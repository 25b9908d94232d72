"""OpenAI request schemas (pydantic) and their translation into SamplingParams."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from jaxllm.errors import InvalidRequestError
from jaxllm.sampling_params import MAX_TOP_LOGPROBS, SamplingParams


class JsonSchemaFormat(BaseModel):
    """OpenAI's response_format.json_schema: the schema under `schema` (strict or not, it is enforced)."""

    model_config = ConfigDict(populate_by_name=True)

    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's extension: exactly one of a JSON schema, a regex, a choice of strings, a Lark grammar, any object."""

    json_schema: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    model_config = ConfigDict(populate_by_name=True)


TokenKey = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,9}$")]  # a token id as a JSON object key
StopText = Annotated[str, StringConstraints(min_length=1)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
MAX_N = 128  # completions per request (OpenAI's limit)


class _Request(BaseModel):
    """What chat and text completions share. The bounds are the engine's (`SamplingParams`), so that the
    published schema (/openapi.json) accepts exactly what the server does."""

    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = Field(default=1, ge=1, le=MAX_N)
    temperature: float | None = Field(default=None, ge=0, le=100)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, lt=2**31)
    min_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=1e6)
    logit_bias: dict[TokenKey, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: StopText | list[StopText] | None = None
    stream: bool = False
    min_tokens: int = Field(default=0, ge=0)  # extensions beyond OpenAI's schema, as vLLM offers them
    ignore_eos: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    def constraint(self) -> dict:
        """The output constraint as SamplingParams keywords, from response_format or structured_outputs."""
        if self.response_format is not None and self.response_format.type != "text" and self.structured_outputs:
            raise InvalidRequestError("give response_format or structured_outputs, not both", param="response_format")
        if self.structured_outputs is not None:
            so = self.structured_outputs
            given = {k: v for k, v in so.model_dump().items() if v not in (None, False)}
            if len(given) != 1:
                raise InvalidRequestError(
                    "structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
                    param="structured_outputs",
                )
            return given
        rf = self.response_format
        if rf is None or rf.type == "text":
            return {}
        if rf.type == "json_object":
            return {"json_object": True}
        if rf.json_schema is None or rf.json_schema.json_schema is None:
            raise InvalidRequestError(
                "response_format of type json_schema needs json_schema.schema", param="response_format.json_schema"
            )
        return {"json_schema": rf.json_schema.json_schema}

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """SamplingParams for this request (values validated there; errors name the field)."""
        given = {
            k: getattr(self, k)
            for k in (
                "temperature",
                "top_p",
                "top_k",
                "min_p",
                "presence_penalty",
                "frequency_penalty",
                "repetition_penalty",
                "seed",
                "stop",
            )
            if getattr(self, k) is not None
        }
        bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        return SamplingParams(
            max_tokens=max_tokens,
            n=self.n,
            logit_bias=bias,
            logprobs=logprobs,
            min_tokens=min(self.min_tokens, max_tokens),
            ignore_eos=self.ignore_eos,
            **given,
            **self.constraint(),
        )


class StreamOptions(BaseModel):
    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None

    def as_template_dict(self) -> dict[str, Any]:
        """The message as chat templates read it: content always a string (an assistant's tool-call message
        has none), tool calls' arguments decoded into objects (as Hugging Face templates expect them)."""
        d = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            d["content"] = "".join(p.text for p in self.content)
        d.setdefault("content", "")
        for call in d.get("tool_calls") or []:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except json.JSONDecodeError:
                    pass  # a template that prints them gets them as they came
        return d


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    include_tool_calls: bool = False  # extension: list the calls the server ran (with server tools)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(default=16, ge=0)  # 0 with echo: score the prompt only
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request: `input` as a string, a list of strings, token ids or lists of them."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as a list (a lone string or token list becomes a list of one); an empty one is refused."""
        given = self.input
        if isinstance(given, str) or (given and isinstance(given[0], int)):
            given = [given]
        if not given or any(len(x) == 0 for x in given):
            raise InvalidRequestError("input must not be empty, nor hold an empty string or token list", "input")
        return given


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[TokenId]


_Request.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
