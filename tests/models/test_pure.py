"""The model as a pure function (`jaxllm.load(...).forward`): transformers' logits and hidden states, gradients
that match finite differences (float and quantized weights), vmap, and edited params that `LLM` generates with."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxllm
from jaxllm import LLM, SamplingParams
from jaxllm.errors import InvalidRequestError

PROMPT = [1, 17, 42, 99, 5, 250, 8, 64, 77, 3]


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models["llama"]


@pytest.mark.parametrize("scan_layers", [True, False])
def test_forward_equals_transformers_logits_and_hidden_states(tiny, scan_layers):
    folder, hf = tiny
    model = jaxllm.load(str(folder), scan_layers=scan_layers, progress=False)
    layers = model.config.num_layers
    fwd = jax.jit(model.forward, static_argnames="hidden_layers")
    logits, hidden = fwd(model.params, jnp.asarray([PROMPT]), hidden_layers=tuple(range(layers - 1)))
    with torch.no_grad():
        out = hf(torch.tensor([PROMPT]), output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(logits[0]), out.logits[0].numpy(), atol=1e-4, rtol=1e-4)
    assert hidden.shape == (layers - 1, 1, len(PROMPT), model.config.hidden_size)
    for i in range(layers - 1):  # transformers' hidden_states[0] is the embedding; its last has the final norm
        np.testing.assert_allclose(np.asarray(hidden[i, 0]), out.hidden_states[i + 1][0].numpy(), atol=1e-4)
    plain = fwd(model.params, jnp.asarray([PROMPT]))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(logits))
    with pytest.raises(InvalidRequestError, match="out of range"):
        model.forward(model.params, jnp.asarray([PROMPT]), hidden_layers=(layers,))


def _loss(model):
    tokens = jnp.asarray([PROMPT[:-1], PROMPT[1:]])
    targets = jnp.asarray([PROMPT[1:], PROMPT[:-1]])

    def loss(params):
        logits = model.forward(params, tokens)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

    return loss


def _check_gradient(loss, params, seed: int = 0, eps: float = 1e-2):
    """<grad, d> equals the central difference of the loss along a random unit direction d (float32)."""
    grads = jax.jit(jax.grad(loss))(params)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.sum(g * g)) for g in leaves) > 0
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    direction = [jax.random.normal(k, g.shape, g.dtype) for k, g in zip(keys, leaves, strict=True)]
    norm = np.sqrt(sum(float(jnp.sum(d * d)) for d in direction))
    direction = jax.tree.unflatten(jax.tree.structure(grads), [d / norm for d in direction])
    analytic = sum(float(jnp.sum(g * d)) for g, d in zip(leaves, jax.tree.leaves(direction), strict=True))
    step = lambda sign: jax.tree.map(lambda p, d: p + sign * eps * d, params, direction)
    f = jax.jit(loss)
    numeric = (float(f(step(1))) - float(f(step(-1)))) / (2 * eps)
    assert abs(analytic - numeric) <= 2e-2 * abs(analytic) + 1e-4, (analytic, numeric)
    assert abs(analytic) > 1e-3  # the direction says something


def test_gradients_match_finite_differences(tiny):
    model = jaxllm.load(str(tiny[0]), progress=False)
    _check_gradient(_loss(model), model.params)


def test_gradients_flow_through_quantized_matmuls(tiny):
    """With int8 weights (the native kernel, which has no gradient of its own) the float params around them
    (the norms, the embedding) get the gradient that finite differences show."""
    model = jaxllm.load(str(tiny[0]), quant="int8", progress=False)
    params = model.params["params"]
    floats = {"embed": params["embed"], "final_norm": params["final_norm"], "attn_norm": params["layers"]["attn_norm"]}

    def loss(f):
        layers = {**params["layers"], "attn_norm": f["attn_norm"]}
        edited = {"params": {**params, "embed": f["embed"], "final_norm": f["final_norm"], "layers": layers}}
        return _loss(model)(edited)

    _check_gradient(loss, floats)


def test_vmap_over_batches_equals_each_batch(tiny):
    model = jaxllm.load(str(tiny[0]), progress=False)
    batches = jnp.asarray([[PROMPT[:6]], [PROMPT[4:]]])  # [2, batch 1, seq 6]
    mapped = jax.vmap(model.forward, in_axes=(None, 0))(model.params, batches)
    for i in range(2):
        np.testing.assert_allclose(
            np.asarray(mapped[i]), np.asarray(model.forward(model.params, batches[i])), atol=1e-5
        )


def _greedy(model, params, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(jnp.argmax(model.forward(params, jnp.asarray([ids]))[0, -1])))
    return ids[len(prompt) :]


def test_edited_params_change_what_llm_generates(tiny):
    """Ablating the attention of layer 0 (its output projection zeroed): LLM(loaded=...) and LLM.set_params
    generate what the pure forward's greedy argmax says for the edited params, and the original again after."""
    model = jaxllm.load(str(tiny[0]), progress=False)
    params = model.params
    o = params["params"]["layers"]["attn"]["o"]
    edited = jax.tree.map(lambda a: a, params)
    edited["params"]["layers"]["attn"]["o"] = o.at[0].set(0.0)
    want_base, want_edit = _greedy(model, params, PROMPT, 8), _greedy(model, edited, PROMPT, 8)
    assert want_base != want_edit

    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    gen = lambda llm: llm.generate([PROMPT], greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert gen(LLM(loaded=model.with_params(edited), max_num_seqs=2, max_model_len=64)) == want_edit
    llm = LLM(loaded=model, max_num_seqs=2, max_model_len=64)
    assert gen(llm) == want_base
    llm.set_params(edited)  # the prompt's pages are in the prefix cache: they must not be reused
    assert gen(llm) == want_edit
    llm.set_params(params)
    assert gen(llm) == want_base

    wrong = jax.tree.map(lambda a: a, params)
    wrong["params"]["final_norm"]["scale"] = jnp.ones((3,), jnp.float32)
    with pytest.raises(InvalidRequestError, match="final_norm"):
        llm.set_params(wrong)
