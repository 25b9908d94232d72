"""The lines of a batch input file, parsed without the model: each becomes a request or a `BadLine`.

Two formats, told apart line by line: ours (`id`, `prompt` or `messages`, sampling fields) and the OpenAI
Batch API's (`custom_id`, `method`, `url`, `body`), whose bodies the server's own pydantic models validate.
Sampling flags given on the command line (`defaults`) fill what a line leaves unset, in both formats.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

from pydantic import BaseModel, ValidationError

from jaxllm.chat_template import validate_messages
from jaxllm.errors import InvalidRequestError, JaxLLMError
from jaxllm.sampling_params import SamplingParams
from jaxllm.serving.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from jaxllm.serving.routes.common import described

PARAM_FIELDS = {f.name for f in dataclasses.fields(SamplingParams) if f.init}
OWN_FIELDS = PARAM_FIELDS | {"id", "prompt", "messages"}
ENVELOPE = ("custom_id", "method", "url", "body")
BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
}
# Body fields that sampling flags fill when a body leaves them out (embedding bodies take none).
SAMPLING_BODY_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop")


@dataclasses.dataclass(frozen=True)
class OwnRequest:
    """A line of our format: `prompt` or `messages`, with its sampling params."""

    lineno: int
    key: object  # the line's `id`, or its line number
    prompt: str | None
    messages: list | None
    params: SamplingParams


@dataclasses.dataclass(frozen=True)
class ApiRequest:
    """A line of the OpenAI Batch API format, its body validated for its url."""

    lineno: int
    key: object  # the line's `custom_id`
    url: str
    body: BaseModel


@dataclasses.dataclass(frozen=True)
class BadLine:
    """A line that cannot run, and why. status, error_type: the HTTP status and OpenAI error type the server
    would have answered its body with (None where there was no body to answer: bad JSON, a bad envelope, our
    format)."""

    lineno: int
    key: object  # the id or custom_id when the line gives one, else None
    code: str
    reason: str
    status: int | None = None
    param: str | None = None
    api: bool = False  # an OpenAI line (the duplicate message names its custom_id)
    error_type: str = "invalid_request_error"

    @property
    def message(self) -> str:
        return f"line {self.lineno}: {self.reason}"


Item = OwnRequest | ApiRequest | BadLine


def read_lines(path: str) -> Iterator[tuple[int, str | None]]:
    """(line number, text) of each non-blank line, read lazily; text None for a line that is not UTF-8."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield lineno, None
                continue
            if text.strip():
                yield lineno, text


def parse_line(text: str | None, lineno: int, defaults: dict) -> Item:
    """One line as a request, or a `BadLine` saying what is wrong with it."""
    if text is None:
        return BadLine(lineno, None, "invalid_json_line", "not UTF-8 text")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return BadLine(lineno, None, "invalid_json_line", f"invalid JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        return BadLine(lineno, None, "invalid_json_line", "expected a JSON object")
    if any(k in obj for k in ENVELOPE):
        return _api_line(obj, lineno, defaults)
    return _own_line(obj, lineno, defaults)


def _own_line(obj: dict, lineno: int, defaults: dict) -> Item:
    key = obj.get("id", lineno)

    def bad(msg):
        return BadLine(lineno, obj.get("id"), "invalid_request", msg)

    unknown = sorted(set(obj) - OWN_FIELDS)
    if unknown:
        return bad(f"unknown field {unknown[0]!r}")
    if ("prompt" in obj) == ("messages" in obj):
        return bad("give exactly one of 'prompt' (a string) or 'messages' (a chat list)")
    if "prompt" in obj and (not isinstance(obj["prompt"], str) or not obj["prompt"]):
        return bad("'prompt' must be a non-empty string")
    if "messages" in obj:
        try:
            validate_messages(obj["messages"])
        except JaxLLMError as e:
            return bad(str(e))
    try:
        params = SamplingParams(**{**defaults, **{k: v for k, v in obj.items() if k in PARAM_FIELDS}})
    except (JaxLLMError, TypeError, ValueError, AttributeError) as e:
        return bad(f"bad sampling value: {e}")
    return OwnRequest(lineno, key, obj.get("prompt"), obj.get("messages"), params)


def _api_line(obj: dict, lineno: int, defaults: dict) -> Item:
    key = obj.get("custom_id")

    def bad(code, msg, status=None, param=None):
        return BadLine(lineno, key if isinstance(key, str) and key else None, code, msg, status, param, api=True)

    unknown = sorted(set(obj) - set(ENVELOPE))
    if unknown:
        return bad("invalid_request", f"unknown field {unknown[0]!r}: a batch line has custom_id, method, url, body")
    if not isinstance(key, str) or not key:
        return bad("missing_custom_id", "'custom_id' must be a non-empty string naming the request")
    if obj.get("method", "POST") != "POST":
        return bad("invalid_method", f"method must be 'POST', got {obj['method']!r}")
    url = obj.get("url")
    if url not in BODIES:
        return bad("invalid_url", f"url {url!r} is not one of {', '.join(BODIES)}")
    body = obj.get("body")
    if not isinstance(body, dict):
        return bad("invalid_request", "'body' must be a JSON object: the request the url takes")
    if url != "/v1/embeddings":
        fill = {k: v for k, v in defaults.items() if k in SAMPLING_BODY_FIELDS and k not in body}
        if "max_completion_tokens" in body:
            fill.pop("max_tokens", None)
        body = {**body, **fill}
    try:  # as the server validates bodies: strictly, errors naming the most specific field
        req = BODIES[url].model_validate_json(json.dumps(body), strict=True)
        _check_body(req)
    except ValidationError as e:
        msg, param = described(e.errors())
        return bad("invalid_request", msg, 400, param)
    except JaxLLMError as e:
        return bad("invalid_request", str(e), 400, e.param)
    return ApiRequest(lineno, key, url, req)


def _check_body(req: BaseModel) -> None:
    """What the routes refuse beyond the schema, and streaming, which a batch line cannot do."""
    if getattr(req, "stream", False):
        raise InvalidRequestError("stream is not supported in a batch job: drop it or set it to false", "stream")
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    if isinstance(req, EmbeddingRequest):
        req.inputs()


def key_of(value) -> str:
    """A request's id as a set member: ids of any JSON type, 1 and "1" kept apart."""
    return json.dumps(value, sort_keys=True)


class InputFile:
    """The items of a JSONL file, read lazily. A second line with an id already seen is a `BadLine`; lines
    answered in an earlier run (`answered`: see `jaxllm.batch.output.scan`) are skipped and counted."""

    def __init__(self, path: str, defaults: dict, answered=None):
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise InvalidRequestError(f"cannot read {path}: {e.strerror}") from None
        self.path, self.defaults, self.answered = path, defaults, answered
        self.skipped = 0

    def count(self) -> int:
        """How many non-blank lines the file has (one quick pass)."""
        return sum(1 for _ in read_lines(self.path))

    def first_bad(self) -> BadLine | None:
        """The first line that cannot run, reading the whole file (for --strict, before the model loads)."""
        return next((item for item in self._items() if isinstance(item, BadLine)), None)

    def __iter__(self) -> Iterator[Item]:
        done = self.answered
        for item in self._items():
            if done is not None and (
                item.lineno in done.lines or (not isinstance(item, BadLine) and key_of(item.key) in done.keys)
            ):
                self.skipped += 1
                continue
            yield item

    def _items(self) -> Iterator[Item]:
        seen: set[str] = set()
        for lineno, text in read_lines(self.path):
            item = parse_line(text, lineno, self.defaults)
            k = key_of(item.key)
            if item.key is not None and k in seen:
                api = isinstance(item, ApiRequest) or (isinstance(item, BadLine) and item.api)
                name = "custom_id" if api else "id"
                msg = f"{name} {item.key!r} was used on an earlier line: give each request its own"
                yield BadLine(lineno, item.key, "duplicate_custom_id", msg, api=api)
                continue
            seen.add(k)
            yield item
