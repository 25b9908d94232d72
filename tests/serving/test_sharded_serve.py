"""`jaxllm serve --tensor-parallel 3` on six CPU devices answers the `openai` client as one device does."""

from __future__ import annotations

import os

import openai
import pytest

from jaxllm.serving.launch import spawn_server

pytestmark = pytest.mark.slow

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three colours of the rainbow."}],
]


def _answers(extra_args: list[str], devices: int, log) -> list[tuple[str, list[float]]]:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    with open(log, "w") as err:
        proc, url = spawn_server(["--max-seqs", "4", "--no-warmup", *extra_args], timeout=600, env=env, stderr=err)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        out = []
        for messages in CHATS:
            r = client.chat.completions.create(
                model="smollm2", messages=messages, temperature=0, max_tokens=16, logprobs=True, top_logprobs=2
            )
            choice = r.choices[0]
            out.append((choice.message.content, [t.logprob for t in choice.logprobs.content]))
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_tensor_parallel_3_answers_as_one_device(tmp_path):
    one = _answers(["--tensor-parallel", "1"], 1, tmp_path / "one.log")
    sharded = _answers(["--tensor-parallel", "3"], 6, tmp_path / "sharded.log")
    assert "sharded: tensor parallel 3 x data parallel 1" in (tmp_path / "sharded.log").read_text()
    assert "Paris" in one[0][0]
    for (text_a, lp_a), (text_b, lp_b) in zip(one, sharded, strict=True):
        assert text_a == text_b
        assert max(abs(a - b) for a, b in zip(lp_a, lp_b, strict=True)) <= 1e-4
