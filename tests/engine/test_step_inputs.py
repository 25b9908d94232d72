"""The scheduler -> runner boundary is plain data: a step's inputs hold only arrays and static numbers, and
replayed on another runner over the same weights they give the same tokens."""

from __future__ import annotations

import pickle

import jax
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.engine.runner import DecodeBatch, MixedBatch, ModelRunner, PrefillBatch, StepInputs
from jaxllm.engine.sampling import SamplerFlags


@pytest.mark.parametrize("mixed_step", [True, False], ids=["mixed", "separate"])
def test_step_inputs_are_plain_data_that_replay_on_another_runner(tiny_models, mixed_step):
    folder, _ = tiny_models["llama"]
    llm = LLM(str(folder), progress=False, max_num_seqs=4, decode_steps=2, mixed_step=mixed_step)
    recorded, produced = [], []
    llm.engine.on_step = recorded.append
    prefill, decode, mixed = llm.runner.prefill, llm.runner.decode, llm.runner.mixed
    llm.runner.prefill = lambda b: _kept(produced, prefill(b))
    llm.runner.decode = lambda b: _kept(produced, decode(b))
    llm.runner.mixed = lambda b: _kept(produced, mixed(b))
    sampled = SamplingParams(temperature=0.9, top_p=0.8, seed=11, max_tokens=9, repetition_penalty=1.2)
    llm.generate(["hello there the", "the cat sat on the mat and a dog"], sampled, use_tqdm=False)
    llm.generate(["xyz"], SamplingParams(temperature=0, max_tokens=5, logprobs=2), use_tqdm=False)
    assert any(s.mixed if mixed_step else s.prefills for s in recorded) and any(s.decode for s in recorded)

    for step in recorded:
        assert isinstance(step, StepInputs)
        for batch in [*step.prefills, step.decode, step.mixed]:
            if batch is None:
                continue
            assert isinstance(batch, (PrefillBatch, DecodeBatch, MixedBatch)) and isinstance(batch.flags, SamplerFlags)
            assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(batch))
    wire = pickle.loads(pickle.dumps(recorded))  # what another process would receive

    replay = ModelRunner(llm.loaded.model, llm.loaded.params, llm.config, decode_steps=2)
    replay.allocate(llm.runner.slots, llm.runner.num_pages, llm.runner.page_size)
    again = []
    for step in wire:
        for batch in step.prefills:
            _kept(again, replay.prefill(batch))
        if step.mixed is not None:
            _kept(again, replay.mixed(step.mixed))
        if step.decode is not None:
            _kept(again, replay.decode(step.decode))
    assert len(again) == len(produced)
    for a, b in zip(again, produced, strict=True):
        np.testing.assert_array_equal(a, b)


def _kept(into: list, result):
    """Store the sampled tokens of a runner call (host copy) and pass the call's result on."""
    into.append(np.asarray(result[0]))
    return result
