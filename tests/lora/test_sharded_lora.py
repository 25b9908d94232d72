"""LoRA adapters served under tensor and data parallelism (8 fake CPU devices) generate what one device does."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    import jax
    from jaxllm import LLM, SamplingParams, lora
    assert len(jax.devices()) == 8
    folder = sys.argv[1]
    prompts = [[1, 17, 42, 99, 5, 250, 8], [1, 17, 42, 99, 5, 250, 8], [1, 17, 42, 99, 5, 250, 8, 64, 77], [1, 9, 9]]
    names = ["a", None, "b", "a"]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    def run(**layout):
        llm = LLM(folder, max_num_seqs=4, max_model_len=64, progress=False, **layout)
        for i, name in enumerate("ab"):
            targets = ("q_proj", "v_proj", "down_proj") if i else ("k_proj", "o_proj", "gate_proj", "up_proj")
            ad = lora.init(llm.config, lora.LoraConfig(rank=4, targets=targets), jax.random.PRNGKey(i))
            ad.weights = jax.tree.map(lambda w: w + 0.2, ad.weights)
            llm.add_lora(name, ad)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False, lora=names)]

    one = run(tensor_parallel=1)
    assert one[0] != one[1], one  # the same prompt through adapter a and through the base model
    assert run(tensor_parallel=2, data_parallel=2) == one
    print("SHARDED-LORA-OK")
    """
)


@pytest.mark.slow
def test_adapters_under_tensor_and_data_parallelism_generate_as_one_device(tiny_models):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_models["llama"][0])],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert "SHARDED-LORA-OK" in proc.stdout, proc.stderr[-3000:]
