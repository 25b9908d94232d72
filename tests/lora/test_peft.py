"""PEFT adapter folders: one written by the `peft` library gives transformers' logits in jaxllm (pure forward
and LLM generation), one jaxllm writes loads into `peft` with the same logits, orbax checkpoints round-trip."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import jaxllm
from jaxllm import LLM, SamplingParams, lora
from jaxllm.errors import InvalidRequestError

PROMPT = [1, 17, 42, 99, 5, 250, 8, 64, 77, 3]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_model(hf, config: peft.LoraConfig, seed: int = 0):
    """A peft model on a copy of `hf` with random (non-zero) lora_B weights."""
    model = peft.get_peft_model(copy.deepcopy(hf), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize(
    "arch, config",
    [
        ("llama", peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL)),
        ("qwen2", peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"], use_rslora=True)),
    ],
    ids=["llama-all-modules", "qwen2-qv-rslora"],
)
def test_a_peft_adapter_gives_transformers_logits(tiny_models, tmp_path, arch, config):
    folder, hf = tiny_models[arch]
    model_peft = _peft_model(hf, config)
    model_peft.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = model_peft(torch.tensor([PROMPT])).logits[0].numpy()
        base = hf(torch.tensor([PROMPT])).logits[0].numpy()
    assert np.abs(want - base).max() > 1e-2  # the adapter changes the logits

    model = jaxllm.load(str(folder), progress=False)
    adapter = lora.load_peft(tmp_path / "adapter", model.config)
    got = model.forward(model.params, jnp.asarray([PROMPT]), adapter=adapter)[0]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)

    # Through the engine: the adapter's greedy continuation is transformers' + peft's, the base's is the base's.
    with torch.no_grad():
        steps = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        want_tokens = model_peft.generate(input_ids=torch.tensor([PROMPT]), **steps)[0, len(PROMPT) :].tolist()
        base_tokens = hf.generate(torch.tensor([PROMPT]), **steps)[0, len(PROMPT) :].tolist()
    llm = LLM(loaded=model, max_num_seqs=4, max_model_len=64, lora={"peft": tmp_path / "adapter"})
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = llm.generate([PROMPT, PROMPT], greedy, use_tqdm=False, lora=["peft", None])
    assert [o.outputs[0].token_ids for o in outs] == [want_tokens, base_tokens]


def test_an_adapter_jaxllm_writes_loads_into_peft(tiny_models, tmp_path):
    folder, hf = tiny_models["llama"]
    model = jaxllm.load(str(folder), progress=False)
    adapter = lora.init(model.config, lora.LoraConfig(rank=3, alpha=6.0, targets=("k_proj", "o_proj", "up_proj")))
    adapter.weights = jax.tree.map(lambda a: a + 0.05, adapter.weights)  # b is zero at init
    lora.save_peft(adapter, tmp_path / "ours", model.config)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    with torch.no_grad():
        want = loaded(torch.tensor([PROMPT])).logits[0].numpy()
    got = model.forward(model.params, jnp.asarray([PROMPT]), adapter=adapter)[0]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_orbax_checkpoints_round_trip(tiny_models, tmp_path):
    model = jaxllm.load(str(tiny_models["llama"][0]), progress=False)
    adapter = lora.init(model.config, lora.LoraConfig(rank=2, targets=("q_proj", "down_proj")))
    lora.save_adapter(adapter, tmp_path / "ckpt")
    back = lora.read_adapter(tmp_path / "ckpt", model.config)
    assert back.config == adapter.config
    for name in adapter.weights:
        for k in ("a", "b"):
            np.testing.assert_array_equal(np.asarray(back.weights[name][k]), np.asarray(adapter.weights[name][k]))


def test_adapters_that_do_not_fit_are_refused_clearly(tiny_models, tmp_path):
    folder, hf = tiny_models["llama"]
    model = jaxllm.load(str(folder), progress=False)
    with pytest.raises(InvalidRequestError, match="not a PEFT adapter folder"):
        lora.load_peft(tmp_path, model.config)
    _peft_model(hf, peft.LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only")).save_pretrained(tmp_path / "b")
    with pytest.raises(InvalidRequestError, match="bias"):
        lora.load_peft(tmp_path / "b", model.config)
    with pytest.raises(InvalidRequestError, match="not modules of this model"):
        lora.init(model.config, lora.LoraConfig(targets=("c_attn",)))
    llm = LLM(loaded=model, max_num_seqs=2, max_model_len=64, max_lora_rank=2)
    with pytest.raises(InvalidRequestError, match="rank 8"):
        llm.add_lora("big", lora.init(model.config))
    with pytest.raises(InvalidRequestError, match="no LoRA adapter named 'nope'"):
        llm.generate([PROMPT], SamplingParams(max_tokens=2), use_tqdm=False, lora="nope")
