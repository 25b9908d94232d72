"""Fine-tuning LoRA adapters with optax, in a notebook: `lora_finetune(model, examples)`.

The base params stay fixed (quantized ones too: the gradient reaches the adapters through the
dequantized weights); only the adapter trains, on the completion tokens of each example.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxllm.errors import InvalidRequestError
from jaxllm.lora import Adapter, LoraConfig, init

PAD_TO = 16  # sequence lengths round up to a multiple of this: few compiled shapes


@dataclasses.dataclass
class FinetuneResult:
    """The trained adapter and the loss of every step (mean cross-entropy per completion token)."""

    adapter: Adapter
    losses: list[float]

    def plot(self, ax=None):
        """The loss curve on a matplotlib axis (a new figure's when none is given)."""
        import matplotlib.pyplot as plt

        ax = ax or plt.figure(figsize=(5, 3)).gca()
        ax.plot(self.losses)
        ax.set(xlabel="step", ylabel="loss", yscale="log", title="LoRA fine-tuning")
        return ax


def encode_examples(tokenizer, examples, max_len: int | None = None) -> list[tuple[list[int], int]]:
    """Each example as (token ids, prompt length): the loss covers the tokens after the prompt. An example is
    a (prompt, completion) pair of strings, a dict with "prompt" and "completion", or a dict with "messages"
    (a chat whose last message is the assistant's answer, rendered with the model's chat template). The
    completion ends with the end-of-sequence token, so that generation stops after it."""
    out = []
    for i, ex in enumerate(examples):
        prompt, completion = _split(tokenizer, ex, i)
        p_ids = tokenizer.encode(prompt)
        c_ids = tokenizer.encode(completion, add_special_tokens=False)
        if tokenizer.eos_id is not None:
            c_ids = c_ids + [tokenizer.eos_id]
        if not c_ids:
            raise InvalidRequestError(f"example {i} has an empty completion: nothing to learn")
        ids = p_ids + c_ids
        if max_len is not None and len(ids) > max_len:
            raise InvalidRequestError(f"example {i} is {len(ids)} tokens, over max_len={max_len}")
        out.append((ids, len(p_ids)))
    return out


def _split(tokenizer, ex, i: int) -> tuple[str, str]:
    if isinstance(ex, tuple | list) and len(ex) == 2:
        return str(ex[0]), str(ex[1])
    if isinstance(ex, dict) and "prompt" in ex and "completion" in ex:
        return str(ex["prompt"]), str(ex["completion"])
    if isinstance(ex, dict) and ex.get("messages"):
        from jaxllm.chat_template import render_chat

        *history, last = ex["messages"]
        if last.get("role") != "assistant":
            raise InvalidRequestError(f"example {i}: the last message must be the assistant's answer")
        t = tokenizer
        prompt = render_chat(t.chat_template, history, bos_token=t.bos_token, eos_token=t.eos_token)
        return prompt, str(last["content"])
    raise InvalidRequestError(
        f"example {i} must be (prompt, completion), {{'prompt', 'completion'}} or {{'messages': [...]}}"
    )


def batches(encoded, batch_size: int, rng: np.random.Generator):
    """Endless shuffled batches: (tokens [batch, len], targets [batch, len], mask [batch, len]) as numpy, len
    a multiple of PAD_TO; mask is 1 where the target is a completion token."""
    while True:
        order = rng.permutation(len(encoded))
        for start in range(0, len(order) - batch_size + 1, batch_size):  # batch_size <= len(encoded)
            pick = [encoded[j] for j in order[start : start + batch_size]]
            length = -(-max(len(ids) - 1 for ids, _ in pick) // PAD_TO) * PAD_TO
            tokens = np.zeros((len(pick), length), np.int32)
            targets = np.zeros((len(pick), length), np.int32)
            mask = np.zeros((len(pick), length), np.float32)
            for r, (ids, n_prompt) in enumerate(pick):
                n = len(ids) - 1
                tokens[r, :n], targets[r, :n] = ids[:-1], ids[1:]
                mask[r, n_prompt - 1 : n] = 1.0
            yield tokens, targets, mask


def lora_loss(model, params, adapter: Adapter, tokens, targets, mask):
    """Mean cross-entropy of `targets` where `mask` is 1: tokens, targets, mask [batch, len]."""
    logits = model.forward(params, tokens, adapter=adapter)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return -jnp.sum(picked * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def lora_finetune(
    model,
    examples,
    config: LoraConfig | None = None,
    *,
    steps: int = 100,
    learning_rate: float = 1e-3,
    batch_size: int = 8,
    optimizer: optax.GradientTransformation | None = None,
    adapter: Adapter | None = None,
    seed: int = 0,
    progress: bool = True,
) -> FinetuneResult:
    """Train a LoRA adapter on `examples` (see `encode_examples`) for `steps` optax steps.

    model: a `jaxllm.load(...)` result (float or quantized base). config: rank, alpha, target modules
    (default `LoraConfig()`: rank 8 on q, k, v and o);
    optimizer: any optax transformation (default: Adam at `learning_rate`); adapter: continue training this
    one instead of a fresh `init`. Returns the adapter and the per-step losses (`.plot()` draws them); a
    progress bar shows the loss as it goes. Hand the adapter to `LLM.add_lora` to serve it at once."""
    if steps < 1 or batch_size < 1 or not examples:
        raise InvalidRequestError("lora_finetune needs examples, steps >= 1 and batch_size >= 1")
    encoded = encode_examples(model.tokenizer, examples, model.config.max_position_embeddings)
    adapter = adapter or init(model.config, config or LoraConfig(), jax.random.PRNGKey(seed))
    opt = optimizer or optax.adam(learning_rate)
    state = opt.init(adapter)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(adapter, state, params, tokens, targets, mask):
        loss, grads = jax.value_and_grad(lambda a: lora_loss(model, params, a, tokens, targets, mask))(adapter)
        updates, state = opt.update(grads, state, adapter)
        return optax.apply_updates(adapter, updates), state, loss

    losses = []
    data = batches(encoded, min(batch_size, len(encoded)), np.random.default_rng(seed))
    bar = tqdm(range(steps), desc="fine-tuning", unit="step", disable=not progress)
    for _ in bar:
        adapter, state, loss = step(adapter, state, model.params, *next(data))
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    return FinetuneResult(adapter, losses)
