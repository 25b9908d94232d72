"""Parsing batch input lines, both formats, without a model."""

from __future__ import annotations

import json

import pytest

from jaxllm.batch.lines import ApiRequest, BadLine, InputFile, OwnRequest, key_of, parse_line
from jaxllm.batch.output import Answered
from jaxllm.errors import InvalidRequestError
from jaxllm.serving.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def api(custom_id="c1", url="/v1/chat/completions", body=None, **extra) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body or CHAT, **extra})


def write(path, *lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(path)


def test_our_line_takes_flag_defaults_under_its_own_fields():
    item = parse_line('{"id": "x", "prompt": "hi", "temperature": 0.5}', 3, {"temperature": 0, "max_tokens": 7})
    assert isinstance(item, OwnRequest) and item.key == "x" and item.prompt == "hi"
    assert item.params.temperature == 0.5 and item.params.max_tokens == 7
    assert parse_line('{"messages": [{"role": "user", "content": "hi"}]}', 9, {}).key == 9  # no id: line number


@pytest.mark.parametrize(
    "url,cls", [("/v1/chat/completions", ChatCompletionRequest), ("/v1/completions", CompletionRequest)]
)
def test_openai_line_is_validated_by_the_server_models(url, cls):
    body = CHAT if cls is ChatCompletionRequest else {"model": "m", "prompt": "hi", "temperature": 1.0}
    item = parse_line(api(url=url, body=body), 1, {"temperature": 0, "max_tokens": 5})
    assert isinstance(item, ApiRequest) and item.key == "c1" and isinstance(item.body, cls)
    assert item.body.max_tokens == 5  # flags fill what the body leaves unset...
    assert item.body.temperature == (0 if cls is ChatCompletionRequest else 1.0)  # ...and the body wins


def test_max_completion_tokens_is_not_overridden_by_the_max_tokens_flag():
    body = {**CHAT, "max_completion_tokens": 3}
    item = parse_line(api(body=body), 1, {"max_tokens": 50})
    assert item.body.max_tokens is None and item.body.max_completion_tokens == 3


def test_embedding_line():
    body = {"model": "e", "input": ["a", "b"], "dimensions": 8}
    item = parse_line(api(url="/v1/embeddings", body=body), 1, {"max_tokens": 5})
    assert isinstance(item.body, EmbeddingRequest) and item.body.inputs() == ["a", "b"]


@pytest.mark.parametrize(
    "line,code,status,words",
    [
        ('{"prompt": "unterminated', "invalid_json_line", None, "invalid JSON"),
        ("[1, 2]", "invalid_json_line", None, "JSON object"),
        (api(url="/v1/nope"), "invalid_url", None, "/v1/nope"),
        (api(method="GET"), "invalid_method", None, "'GET'"),
        (api(custom_id=""), "missing_custom_id", None, "custom_id"),
        (json.dumps({"custom_id": "c", "url": "/v1/completions", "body": "hi"}), "invalid_request", None, "body"),
        (api(header=1), "invalid_request", None, "'header'"),
        (api(body={"model": "m"}), "invalid_request", 400, "messages"),
        (api(body={**CHAT, "stream": True}), "invalid_request", 400, "stream"),
        (api(body={**CHAT, "top_logprobs": 2}), "invalid_request", 400, "top_logprobs"),
        (api(url="/v1/embeddings", body={"model": "e", "input": []}), "invalid_request", 400, "input"),
        ('{"id": 1, "prompt": "hi", "temprature": 1}', "invalid_request", None, "unknown field 'temprature'"),
        ('{"prompt": "hi", "temperature": -1}', "invalid_request", None, "temperature"),
    ],
)
def test_bad_lines_say_what_is_wrong(line, code, status, words):
    item = parse_line(line, 4, {})
    assert isinstance(item, BadLine), item
    assert (item.code, item.status) == (code, status)
    assert item.message.startswith("line 4: ") and words in item.message


def test_a_repeated_id_is_an_error_for_its_second_line_only(tmp_path):
    path = write(
        tmp_path / "in.jsonl",
        {"id": "a", "prompt": "one"},
        api("a"),  # another format, another namespace: custom_id "a" is still the id "a"
        "",
        {"id": "b", "prompt": "two"},
        api("b"),
        {"prompt": "no id"},
        {"id": 6, "prompt": "id 6 is line 6's default id too"},
    )
    items = list(InputFile(path, {}))
    assert [(i.lineno, type(i).__name__) for i in items] == [
        (1, "OwnRequest"),
        (2, "BadLine"),
        (4, "OwnRequest"),
        (5, "BadLine"),
        (6, "OwnRequest"),
        (7, "BadLine"),
    ]
    assert items[1].code == "duplicate_custom_id" and "custom_id 'a'" in items[1].message
    assert "line 7: id 6 was used" in items[5].message


def test_resume_skips_answered_ids_and_lines(tmp_path):
    path = write(tmp_path / "in.jsonl", {"id": "a", "prompt": "x"}, "oops", {"id": "b", "prompt": "y"}, api("c"))
    answered = Answered({key_of("a"), key_of("c")}, {2})
    source = InputFile(path, {}, answered)
    assert [i.key for i in source] == ["b"]
    assert source.skipped == 3


def test_file_checks(tmp_path):
    with pytest.raises(InvalidRequestError, match="cannot read .*missing.jsonl"):
        InputFile(str(tmp_path / "missing.jsonl"), {})
    path = write(tmp_path / "in.jsonl", {"prompt": "x"}, "", "bad", {"prompt": "y", "top_k": -1})
    source = InputFile(path, {})
    assert source.count() == 3
    assert source.first_bad().lineno == 3
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    assert "not UTF-8" in next(iter(InputFile(str(tmp_path / "latin1.jsonl"), {}))).message
