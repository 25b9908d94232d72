"""A server compiles every step shape before /health turns 200, reports how many and how long, and then
serves requests of every kind without compiling again."""

from __future__ import annotations

import concurrent.futures
import logging
import re
import time

import httpx
import pytest

from jaxllm import LLM
from jaxllm.serving import create_app
from tests.serving.conftest import RunningServer

pytestmark = pytest.mark.slow


def _metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_warmup_compiles_the_bounded_surface_before_health_and_serving_compiles_nothing(tiny_models, caplog):
    folder, _ = tiny_models["llama"]
    llm = LLM(str(folder), max_num_seqs=2, max_model_len=256, token_budget=64, mixed_step=True, progress=False)
    surface_size = None
    caplog.set_level(logging.INFO, logger="jaxllm.serving.app")
    start = time.perf_counter()
    with RunningServer(create_app(llm, served_model_name="tiny")) as server:
        healthy = time.perf_counter() - start
        surface = llm.engine.surface
        surface_size = len(surface.mixed_shapes()) + len(surface.decode_shapes()) + len(surface.grammar_shapes())
        # 2 slots, 64 prompt tokens a step: tokens 16/32/64/66 x sequences 1/2 x 2 sampler variants, and the
        # 4 token counts scoring prompts; decode rows 1/2 x 2 sampler variants; the same mixed steps and
        # one-step decodes under a grammar
        assert surface_size == 2 * (4 * 2 * 2 + 4) + 2 * 2 + 2 * 2
        metrics = httpx.get(server.url + "/metrics").text
        assert _metric(metrics, "jaxllm_warmup_compiled_shapes") == surface_size
        seconds = _metric(metrics, "jaxllm_warmup_seconds")
        assert 0 < seconds < healthy
        assert f"compiled {surface_size} step shapes in {seconds:.1f} s" in caplog.text
        before = dict(llm.runner.compiles)
        assert before == {
            "mixed": 20,
            "decode": 4,
            "mixed_forward": 8 + 4,
            "mixed_sample": 16 + 4,
            "decode_forward": 2,
            "decode_sample": 4,
        }

        def complete(body):
            r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", **body}, timeout=120)
            assert r.status_code == 200, r.text
            return r

        bodies = [
            {"prompt": [5] * n, "max_tokens": 12, "temperature": t, "seed": 3, "ignore_eos": True}
            for n, t in ((3, 0), (40, 0.8), (200, 0), (100, 1.0))
        ] + [
            {"prompt": [7] * 30, "max_tokens": 6, "n": 2, "temperature": 0.9, "logprobs": 2},
            {"prompt": [9] * 70, "max_tokens": 8, "presence_penalty": 0.5, "logit_bias": {"5": 3}, "stream": True},
            {"prompt": [11] * 90, "max_tokens": 0, "echo": True, "logprobs": 1},  # scoring, over two steps
            {"prompt": [12] * 20, "max_tokens": 3, "echo": True, "logprobs": 0, "temperature": 0.5},
            {"prompt": [13] * 10, "max_tokens": 8, "structured_outputs": {"regex": "[a-z]{2,12}"}, "temperature": 0},
            {"prompt": [14] * 50, "max_tokens": 8, "structured_outputs": {"choice": ["yes", "no"]}, "temperature": 1},
        ]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(complete, bodies))
        assert dict(llm.runner.compiles) == before
