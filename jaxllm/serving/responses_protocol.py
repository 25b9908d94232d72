"""The Responses API's request (pydantic) and its translation into a chat request.

A response request is a chat in another shape: `input` items become chat messages (a `function_call` item an
assistant message's tool call, a `function_call_output` item a `tool` message), `instructions` a system message,
function `tools` the chat's tools, `text.format` the chat's `response_format`. The conversation of a
`previous_response_id` comes first; its instructions do not carry over (as with OpenAI).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jaxllm.errors import InvalidRequestError
from jaxllm.serving.protocol import ChatCompletionRequest, StreamOptions, TokenKey


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call_output"]
    call_id: str
    output: str


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(BaseModel):
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    """`text.format`: plain text, any JSON object, or JSON following `schema`."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    """POST /v1/responses."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, lt=2**31)
    seed: int | None = None
    logit_bias: dict[TokenKey, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    def input_messages(self) -> list[dict]:
        """This request's input as chat messages (without the instructions)."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        out: list[dict] = []
        for item in self.input:
            if isinstance(item, MessageItem):
                out.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                fn = {"name": item.name, "arguments": item.arguments}
                call = {"id": item.call_id, "type": "function", "function": fn}
                last = out[-1] if out else None
                if last and last["role"] == "assistant" and "tool_calls" in last:  # parallel calls: one message
                    last["tool_calls"].append(call)
                else:
                    out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            else:
                out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        if not out:
            raise InvalidRequestError("input must hold at least one item", param="input")
        return out

    def as_chat(self, history: list[dict]) -> ChatCompletionRequest:
        """The chat request this response request amounts to, after the `history` of a previous response."""
        messages = ([{"role": "system", "content": self.instructions}] if self.instructions else []) + history
        messages += self.input_messages()
        chat = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_output_tokens,
            "stream": self.stream,
            "parallel_tool_calls": self.parallel_tool_calls,
            **self.model_dump(
                include={"temperature", "top_p", "top_k", "seed", "logit_bias", "user"}, exclude_none=True
            ),
        }
        if self.tools:
            chat["tools"] = [
                {
                    "type": "function",
                    "function": t.model_dump(include={"name", "description", "parameters"}, exclude_none=True),
                }
                for t in self.tools
            ]
        if self.tool_choice is not None:
            named = isinstance(self.tool_choice, NamedFunction)
            chat["tool_choice"] = (
                {"type": "function", "function": {"name": self.tool_choice.name}} if named else self.tool_choice
            )
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_schema":
            if fmt.schema_ is None:
                raise InvalidRequestError("text.format of type json_schema needs a schema", param="text.format.schema")
            spec = {"name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}
            chat["response_format"] = {"type": "json_schema", "json_schema": spec}
        elif fmt is not None:
            chat["response_format"] = {"type": fmt.type}
        return ChatCompletionRequest.model_validate(chat)
