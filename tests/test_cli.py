"""The `jaxllm` command, run for real in a subprocess (`python -m jaxllm ...`) from the repository root.

Runs that load the packaged SmolLM2 are marked slow and kept few; argument and request mistakes must fail
before any model is loaded, with one `error:` line on stderr, exit status 2 and no traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import minilm_folder

ROOT = Path(__file__).resolve().parent.parent
GREEDY = ["--temperature", "0", "--max-tokens", "8"]


def jaxllm(*args, stdin: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxllm", *map(str, args)],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2 with exactly one `error: ...` line (mentioning `words`) on stderr and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def write_jsonl(path: Path, *lines) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


# ---- failing before the model loads (fast) -------------------------------------------------------
def test_help_lists_subcommands():
    proc = jaxllm("--help")
    assert proc.returncode == 0
    for cmd in ("generate", "run", "bench"):
        assert cmd in proc.stdout


def test_nonexistent_model():
    assert_error(jaxllm("generate", "--model", "/nonexistent/x.gguf", "hi"), "/nonexistent/x.gguf")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"\x00garbage, not a gguf file\xff" * 200)
    assert_error(jaxllm("generate", "--model", bad, "hi"), "bad.gguf")


@pytest.mark.parametrize(
    "args,word",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--max-tokens", "-1"], "max_tokens"),
    ],
)
def test_invalid_sampling_value(args, word):
    assert_error(jaxllm("generate", *args, "hi"), word)


def test_argparse_mistakes_exit_2():
    proc = jaxllm("generate", "--max-tokens", "many", "hi")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = jaxllm("generate", "--max-model-len", "0", "hi")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_missing_prompt_and_misused_flags(tmp_path):
    assert_error(jaxllm("generate"), "PROMPT")
    assert_error(jaxllm("generate", "hi", "--output", tmp_path / "o.jsonl"), "--output")
    reqs = write_jsonl(tmp_path / "r.jsonl", {"prompt": "hi"})
    assert_error(jaxllm("generate", "hi", "--input", reqs), "not both")
    assert_error(jaxllm("generate", "--input", tmp_path / "missing.jsonl"), "missing.jsonl")


@pytest.mark.parametrize(
    "bad_line,word",
    [
        ('{"prompt": "unterminated', "invalid JSON"),
        ({"text": "neither prompt nor messages"}, "unknown field 'text'"),
        ({"max_tokens": 4}, "exactly one of"),
        ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, "exactly one of"),
        ({"prompt": "hi", "temprature": 0.5}, "unknown field 'temprature'"),
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "temperature": "hot"}, "bad sampling value"),
        ({"prompt": "hi", "n": 0}, "n must be"),
        ({"prompt": 42}, "'prompt' must be"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
        ('["a list"]', "JSON object"),
    ],
)
def test_malformed_jsonl_line(tmp_path, bad_line, word):
    reqs = write_jsonl(tmp_path / "r.jsonl", {"prompt": "fine"}, "", bad_line, {"prompt": "also fine"})
    out = tmp_path / "out.jsonl"
    assert_error(jaxllm("generate", "--input", reqs, "--output", out), "line 3", word)
    assert not out.exists()


def test_bench_reaches_the_benchmark_script():
    proc = jaxllm("bench", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--modes" in proc.stdout and "--quant" in proc.stdout
    proc = jaxllm("bench", "--tokens", "1")
    assert proc.returncode == 2 and "--tokens must be >= 2" in proc.stderr and "Traceback" not in proc.stderr


# ---- loading the real model (slow, at most four runs) ---------------------------------------------
@pytest.mark.slow
def test_generate_chat_answers():
    proc = jaxllm("generate", "--chat", "What is the capital of France?", "--temperature", "0", "--max-tokens", "16")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "Traceback" not in proc.stderr


CITY = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "size": {"enum": ["small", "big"]}},
    "required": ["name", "size"],
    "additionalProperties": False,
}


@pytest.mark.slow
def test_generate_jsonl_batch(tmp_path):
    reqs = write_jsonl(
        tmp_path / "r.jsonl",
        {"id": "plain", "prompt": "The capital of France is", "max_tokens": 6},
        {"id": "chat", "messages": [{"role": "user", "content": "Say hello."}], "stop": ["\n\n"]},
        {"id": "two", "prompt": "Once upon a time", "n": 2, "temperature": 0.8, "seed": 3, "max_tokens": 5},
        {"id": "json", "prompt": "A city as JSON:", "json_schema": CITY, "max_tokens": 60},
    )
    out = tmp_path / "out.jsonl"
    proc = jaxllm("generate", "--input", reqs, "--output", out, *GREEDY)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["plain", "chat", "two", "json"]
    assert [len(r["choices"]) for r in rows] == [1, 1, 2, 1]
    assert rows[3]["finish_reason"] == "stop" and set(json.loads(rows[3]["text"])) == {"name", "size"}
    for r, limit in zip(rows[:3], (6, 8, 5), strict=True):
        assert r["text"] == r["choices"][0]["text"] and r["finish_reason"] == r["choices"][0]["finish_reason"]
        assert r["token_ids"] == r["choices"][0]["token_ids"]
        assert [c["index"] for c in r["choices"]] == list(range(len(r["choices"])))
        for c in r["choices"]:
            assert 1 <= len(c["token_ids"]) <= limit and c["finish_reason"] in ("stop", "length")
        u = r["usage"]
        assert u["completion_tokens"] == sum(len(c["token_ids"]) for c in r["choices"])
        assert u["prompt_tokens"] > 0 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert "Paris" in rows[0]["text"]
    assert rows[1]["usage"]["prompt_tokens"] > rows[0]["usage"]["prompt_tokens"]  # chat template applied


@pytest.mark.slow
def test_run_repl():
    proc = jaxllm("run", *GREEDY, stdin="/help\n/bogus\nHello\n/temperature -3\n/exit\nnever read\n")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "/system" in proc.stdout  # the help text
    assert "unknown command /bogus" in proc.stdout
    assert "error: temperature must be in" in proc.stdout
    answer = proc.stdout.split(">>> ")[3]  # after /help and /bogus: the streamed reply to "Hello"
    assert answer.strip()


@pytest.mark.slow
def test_prompt_longer_than_context():
    assert_error(jaxllm("generate", "--max-model-len", "32", *GREEDY, "word " * 100), "context")


# ---- the REPL's bookkeeping, in-process with a stand-in model (fast) -------------------------------
class FakeLLM:
    """Streams a canned reply and records the conversations and params it was given."""

    class loaded:  # noqa: N801 - mimics LLM.loaded.name
        name = "fake"

    def __init__(self):
        self.calls = []

    def stream_chat(self, messages, params):
        from jaxllm.outputs import StreamDelta

        self.calls.append(([dict(m) for m in messages], params))
        for piece in ("Hi", " there"):
            yield StreamDelta(0, piece, [1], [], None)


def test_run_repl_history_and_commands(monkeypatch, capsys):
    from jaxllm import cli

    fake = FakeLLM()
    monkeypatch.setattr(cli, "_load", lambda args: fake)
    lines = iter(["one", "two", "/temperature 0.5", "/system Be brief.", "three", "/clear", "four"])

    def fake_input(prompt):
        print(prompt, end="")
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert cli.main(["run", "--system", "S", "--temperature", "0"]) == 0  # EOF ends it cleanly
    out = capsys.readouterr().out
    assert out.count("Hi there\n") == 4
    convs = [[(m["role"], m["content"]) for m in msgs] for msgs, _ in fake.calls]
    assert convs[0] == [("system", "S"), ("user", "one")]
    assert convs[1] == [("system", "S"), ("user", "one"), ("assistant", "Hi there"), ("user", "two")]
    assert convs[2] == [("system", "Be brief."), ("user", "three")]
    assert convs[3] == [("system", "Be brief."), ("user", "four")]
    assert [p.temperature for _, p in fake.calls] == [0.0, 0.0, 0.5, 0.5]


def test_quantization_flags_are_checked_before_loading(tmp_path):
    for cmd in ("generate", "run", "serve", "perplexity"):
        proc = jaxllm(cmd, "--quant", "int3", "--file", tmp_path / "t.txt", timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "unknown quantization 'int3'" in proc.stderr and "int4-g64" in proc.stderr
    assert_error(jaxllm("perplexity", "--file", tmp_path / "missing.txt"), "missing.txt")


@pytest.mark.slow
def test_perplexity_with_in_situ_int8():
    proc = jaxllm("perplexity", "--file", ROOT / "tests" / "data" / "perplexity.txt", "--quant", "int8", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["tokens_scored"] > 1800 and res["windows"] == 4
    assert 15 < res["perplexity"] < 25  # float32: 19.90 (tests/models/test_quantized.py holds the 1% bound)
    assert res["weight_mib"] < 250  # int8 layers beside the float embedding; float32 is 513 MiB


def test_serve_lora_flags_are_checked(tiny_models, tmp_path):
    proc = jaxllm("serve", "--lora", "nameonly")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "'nameonly' is not NAME=PATH" in proc.stderr
    folder = tiny_models["llama"][0]
    proc = jaxllm("serve", "--model", folder, "--lora", f"x={tmp_path / 'missing'}", "--no-warmup")
    assert_error(proc, "missing", "adapter")


def test_agent_tool_flags_are_checked_before_loading(tmp_path):
    assert_error(jaxllm("serve", "--enable-agent-tools"), "--agent-sandbox-root")
    assert_error(jaxllm("serve", "--agent-sandbox-root", tmp_path), "--enable-agent-tools")
    missing = tmp_path / "nope"
    assert_error(jaxllm("serve", "--enable-agent-tools", "--agent-sandbox-root", missing), "not a directory")


def test_serve_says_which_agent_tools_it_registers(tmp_path, caplog):
    import logging

    from jaxllm.cli import build_parser
    from jaxllm.serving.serve_command import server_tools

    args = build_parser().parse_args(
        ["serve", "--enable-agent-tools", "--agent-sandbox-root", str(tmp_path), "--agent-readonly", "."]
    )
    caplog.set_level(logging.INFO)
    tools = server_tools(args, logging.getLogger("jaxllm.serving.serve_command"))
    names = [t.name for t in tools]
    assert {"read_file", "write_file", "shell"} <= set(names) and all(t.source == "agent" for t in tools)
    assert f"agent tools in {tmp_path.resolve()}: read_file, list_dir" in caplog.text


def test_a_bad_mcp_config_is_refused_before_loading(tmp_path):
    bad = tmp_path / "mcp.json"
    bad.write_text('{"servers": [{"id": "x", "source": {"type": "process"}}]}')
    assert_error(jaxllm("serve", "--mcp-config", bad), "mcp.json", "'command'")
    assert_error(jaxllm("serve", "--mcp-config", tmp_path / "missing.json"), "cannot read")


def test_serve_embedding_and_responses_flags_are_checked_before_loading(tmp_path):
    assert_error(jaxllm("serve", "--pooling", "banana"), "pooling 'banana'", "lasttoken")
    assert_error(jaxllm("serve", "--responses-db", tmp_path / "missing" / "r.sqlite"), "responses database")
    encoder = minilm_folder()
    assert_error(jaxllm("serve", "--model", encoder, "--lora", f"x={tmp_path}"), "embedding model", "--lora")
    assert_error(jaxllm("serve", "--model", encoder, "--pooling", "mean"), "--pooling is for decoders")
