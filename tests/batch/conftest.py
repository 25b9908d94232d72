"""A tiny random-weight Llama for batch jobs, on disk (for `jaxllm batch --model FOLDER`) and loaded."""

from __future__ import annotations

import pytest

from tests.conftest import make_tiny_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-batch")
    make_tiny_model(folder, "llama")
    return folder


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama):
    from jaxllm import LLM

    return LLM(str(tiny_llama), max_num_seqs=2, progress=False)
