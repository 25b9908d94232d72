"""LoRA fine-tuning with optax: a tiny model memorises answers, then serves them per request through LLM and
the server, each row through its own adapter, the base model's answer unchanged in the same batch."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import jaxllm
from jaxllm import LLM, SamplingParams, lora
from jaxllm.errors import InvalidRequestError
from jaxllm.serving import create_app
from jaxllm.train import encode_examples, lora_finetune
from tests.conftest import make_tiny_model
from tests.serving.conftest import RunningServer

PROMPT = "Q: the code word?\nA:"
ANSWERS = {"alpha": " zebra kite", "bravo": " moon lamp"}
GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama whose random weights are large enough (std 0.2) for its logits to reach a confident answer:
    at the default 0.02 the LM head caps every logit near 1, and no adapter on the layers can memorise."""
    folder = tmp_path_factory.mktemp("tiny-trainable")
    make_tiny_model(folder, "llama", initializer_range=0.2)
    return folder


@pytest.fixture(scope="module")
def trained(tiny):
    """The tiny llama (float) and an adapter per answer, each fine-tuned on the one example."""
    model = jaxllm.load(str(tiny), progress=False)
    config = lora.LoraConfig(rank=8, alpha=16.0, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    results = {
        name: lora_finetune(model, [(PROMPT, answer)], config, steps=60, learning_rate=2e-2, progress=False)
        for name, answer in ANSWERS.items()
    }
    return model, results


def test_fine_tuning_memorises_and_llm_serves_each_adapter_per_row(trained):
    model, results = trained
    for r in results.values():
        assert r.losses[-1] < 0.05 < r.losses[0]
    llm = LLM(loaded=model, max_num_seqs=4, max_model_len=64)
    base_alone = llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].text
    for name, r in results.items():
        llm.add_lora(name, r.adapter)  # no restart: served from the next step on
    outs = llm.generate([PROMPT] * 3, GREEDY, use_tqdm=False, lora=["alpha", None, "bravo"])
    texts = [o.outputs[0].text for o in outs]
    assert texts == [ANSWERS["alpha"], base_alone, ANSWERS["bravo"]]
    # The adapters' prompt pages are their own: the base model after them still answers as before.
    assert llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].text == base_alone
    llm.remove_lora("bravo")
    with pytest.raises(InvalidRequestError, match="no LoRA adapter named 'bravo'"):
        llm.generate(PROMPT, GREEDY, use_tqdm=False, lora="bravo")


def test_adding_an_adapter_compiles_nothing(trained):
    model, results = trained
    llm = LLM(
        loaded=model, max_num_seqs=4, max_model_len=64, prefix_caching=False, lora={"a": results["alpha"].adapter}
    )
    assert llm.generate(PROMPT, GREEDY, use_tqdm=False, lora="a")[0].outputs[0].text == ANSWERS["alpha"]
    compiled = dict(llm.runner.compiles)
    llm.add_lora("b", results["alpha"].adapter)  # another slot: new values, the same shapes
    assert llm.generate(PROMPT, GREEDY, use_tqdm=False, lora="b")[0].outputs[0].text == ANSWERS["alpha"]
    assert dict(llm.runner.compiles) == compiled


def test_the_server_serves_the_adapter_named_in_model(trained, tmp_path):
    model, results = trained
    lora.save_peft(results["alpha"].adapter, tmp_path / "alpha", model.config)
    llm = LLM(loaded=model, max_num_seqs=4, max_model_len=64, lora={"alpha": tmp_path / "alpha"})
    with RunningServer(create_app(llm, served_model_name="tiny", warmup=False)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        ids = [m.id for m in client.models.list().data]
        assert ids == ["tiny", "alpha"]
        ask = lambda name: client.completions.create(model=name, prompt=PROMPT, max_tokens=16, temperature=0)
        base_alone = ask("tiny").choices[0].text
        with ThreadPoolExecutor(4) as pool:  # concurrent requests share the running batch
            texts = [r.choices[0].text for r in pool.map(ask, ["alpha", "tiny", "alpha", "tiny"])]
        assert texts == [ANSWERS["alpha"], base_alone] * 2
        assert base_alone != ANSWERS["alpha"]
        with pytest.raises(openai.NotFoundError):
            ask("bravo")


def test_a_quantized_base_fine_tunes_too(tiny):
    model = jaxllm.load(str(tiny), quant="int8", progress=False)
    result = lora_finetune(model, [(PROMPT, ANSWERS["alpha"])], steps=60, learning_rate=2e-2, progress=False)
    assert result.losses[-1] < 0.05
    llm = LLM(loaded=model, max_num_seqs=2, max_model_len=64, lora={"alpha": result.adapter})
    assert llm.generate(PROMPT, GREEDY, use_tqdm=False, lora="alpha")[0].outputs[0].text == ANSWERS["alpha"]


def test_examples_are_encoded_with_the_loss_on_the_completion(tiny_models):
    tok = jaxllm.load(str(tiny_models["llama"][0]), progress=False).tokenizer
    [(ids, n_prompt)] = encode_examples(tok, [{"prompt": "ab", "completion": "cd"}])
    assert ids[:n_prompt] == tok.encode("ab") and ids[n_prompt:] == tok.encode("cd", add_special_tokens=False) + [
        tok.eos_id
    ]
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    [(ids, n_prompt)] = encode_examples(tok, [chat])
    assert tok.decode(ids[:n_prompt]).endswith("<|assistant|>")
    with pytest.raises(InvalidRequestError, match="example 0"):
        encode_examples(tok, [{"text": "x"}])
