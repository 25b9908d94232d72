"""The tool registry: calls validated against each tool's schema, and a tool that raises, hangs or returns too
much gives the model an error (or a cut result) without holding up other calls."""

from __future__ import annotations

import threading
import time

import pytest

from jaxllm.errors import InvalidRequestError
from jaxllm.tools import Tool, ToolRegistry

ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}


@pytest.fixture
def registry():
    reg = ToolRegistry(max_result_chars=1000)
    release = threading.Event()
    reg.register(Tool("add", "Add two integers.", ADD, lambda a, b: a + b))
    reg.register(Tool("boom", "Fails.", {"type": "object"}, lambda: 1 / 0))
    reg.register(Tool("hang", "Never returns.", {"type": "object"}, lambda: release.wait(30), timeout=0.5))
    reg.register(Tool("flood", "Megabytes.", {"type": "object"}, lambda: "x" * 5_000_000))
    yield reg
    release.set()


def test_a_call_returns_its_result_as_text(registry):
    assert registry.call("add", '{"a": 2, "b": 3}').content == "5"
    assert registry.call("add", {"a": 2, "b": 3}).error is False


@pytest.mark.parametrize(
    "name, arguments, words",
    [
        ("add", '{"a": 2', ["not valid JSON"]),
        ("add", "[1, 2]", ["JSON object"]),
        ("add", '{"a": 2}', ["invalid arguments", "'b' is a required property"]),
        ("add", '{"a": "two", "b": 3}', ["invalid arguments", "a:", "not of type 'integer'"]),
        ("nope", "{}", ["no tool named 'nope'", "add"]),
        ("boom", "{}", ["boom failed", "ZeroDivisionError"]),
    ],
)
def test_mistakes_and_failures_are_error_results(registry, name, arguments, words):
    result = registry.call(name, arguments)
    assert result.error and all(w in result.content for w in words), result.content


def test_hung_tools_never_hold_up_other_calls(registry):
    """More hung calls than any pool would have threads: the next call is still answered at once."""
    hung = [threading.Thread(target=registry.call, args=("hang", {})) for _ in range(20)]
    for t in hung:
        t.start()
    start = time.monotonic()
    assert registry.call("add", {"a": 1, "b": 2}).content == "3" and time.monotonic() - start < 0.3
    for t in hung:
        t.join()


def test_a_hung_tool_times_out_without_blocking_other_calls(registry):
    start = time.monotonic()
    results = {}
    threads = [threading.Thread(target=lambda: results.update(hang=registry.call("hang", {})))]
    threads[0].start()
    time.sleep(0.05)
    assert registry.call("add", {"a": 1, "b": 1}).content == "2"
    assert time.monotonic() - start < 0.4  # answered while the hung tool still runs
    threads[0].join()
    assert results["hang"].error and "did not finish within 0.5 s" in results["hang"].content


def test_a_huge_result_is_cut(registry):
    result = registry.call("flood", {})
    assert not result.error and len(result.content) < 1100 and "more characters cut" in result.content


def test_bad_registrations_are_refused():
    reg = ToolRegistry()
    reg.register(Tool("ok", "", {"type": "object"}, lambda: "ok"))
    with pytest.raises(InvalidRequestError, match="registered already"):
        reg.register(Tool("ok", "", {"type": "object"}, lambda: "again", source="mcp:x"))
    with pytest.raises(InvalidRequestError, match="letters, digits"):
        reg.register(Tool("bad name!", "", {"type": "object"}, lambda: ""))
    with pytest.raises(InvalidRequestError, match="invalid parameters schema"):
        reg.register(Tool("worse", "", {"type": "nonsense"}, lambda: ""))
    assert [t["name"] for t in reg.describe()] == ["ok"] and reg.describe()[0]["source"] == "python"
