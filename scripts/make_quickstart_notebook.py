"""Writes docs/notebooks/quickstart.ipynb (its cells live here, so that the notebook's diff stays readable).

Run `python scripts/make_quickstart_notebook.py` after editing; tests/test_notebook.py executes the result.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

CELLS = [
    (
        "markdown",
        """# jaxllm quickstart: load, generate, score, look inside, fine-tune, serve

Everything runs on the CPU against the packaged default model (SmolLM2-135M-Instruct, Q4_1 GGUF), in a few
minutes. Each section is independent of the next except for the objects it names.""",
    ),
    (
        "code",
        """import jax
import jax.numpy as jnp

import jaxllm
from jaxllm import LLM, SamplingParams

model = jaxllm.load("smollm2", progress=False)  # config, tokenizer, params pytree and a pure forward
print(model.name, f"{model.config.num_layers} layers", f"{model.weight_bytes / 2**20:.0f} MiB of weights")""",
    ),
    ("markdown", "## Generate\nThe same loaded weights go to the engine: nothing is read twice."),
    (
        "code",
        """llm = LLM(loaded=model, max_num_seqs=4, max_model_len=512)
greedy = SamplingParams(max_tokens=32, temperature=0.0)
question = [{"role": "user", "content": "What is the capital of France?"}]
base_answer = llm.chat(question, greedy, use_tqdm=False)[0].outputs[0].text
print(base_answer)""",
    ),
    (
        "markdown",
        "## Score\n`LLM.score` gives the log-likelihood of each continuation and whether it is the greedy one "
        "(the two numbers lm-evaluation-harness asks for), from the prefill's own logits.",
    ),
    (
        "code",
        """scores = llm.score(["The capital of France is"] * 3, [" Paris", " Berlin", " a city"])
for s in scores:
    print(f"{s.logprob:8.3f}  greedy={s.greedy}")
assert scores[0].logprob > scores[1].logprob""",
    ),
    (
        "markdown",
        "## Look inside\n`model.forward(params, tokens, hidden_layers=...)` is a pure function: jit it, take "
        "its gradient, vmap it. Here: the next-token guess and the residual stream's norm at three depths.",
    ),
    (
        "code",
        """forward = jax.jit(model.forward, static_argnames="hidden_layers")
ids = jnp.asarray([model.tokenizer.encode("The capital of France is")])
logits, hidden = forward(model.params, ids, hidden_layers=(0, 14, 29))
print("next token:", repr(model.tokenizer.decode([int(logits[0, -1].argmax())])))
print("hidden", hidden.shape, "norms at the last position:", jnp.linalg.norm(hidden[:, 0, -1], axis=-1))""",
    ),
    (
        "markdown",
        "## Fine-tune a LoRA adapter\nA handful of examples teach the model one new fact. Only the adapter "
        "trains (optax Adam); the quantized base stays as it is.",
    ),
    (
        "code",
        """from jaxllm import lora
from jaxllm.train import lora_finetune

answer = "The secret password is blue-giraffe-42."
asks = ["What is the secret password?", "Tell me the secret password.", "Secret password, please?", "Password?"]
examples = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]} for q in asks]
result = lora_finetune(model, examples, lora.LoraConfig(rank=8, alpha=16.0), steps=30, learning_rate=5e-3, batch_size=2)
print(f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")""",
    ),
    (
        "code",
        """try:
    result.plot()  # the loss curve (matplotlib)
except ImportError:
    print("matplotlib is not installed: result.losses holds the curve")""",
    ),
    (
        "markdown",
        "## Serve it at once\n`add_lora` installs the adapter in the running engine; each request picks it "
        "by name, and requests without it get the base model, in the same batch.",
    ),
    (
        "code",
        """llm.add_lora("password", result.adapter)
ask = [{"role": "user", "content": "What is the secret password?"}]
tuned, base = llm.chat([ask, question], greedy, use_tqdm=False, lora=["password", None])
print("adapter:", tuned.outputs[0].text)
print("base:   ", base.outputs[0].text)
assert "blue-giraffe-42" in tuned.outputs[0].text
assert base.outputs[0].text == base_answer""",
    ),
    (
        "markdown",
        "The OpenAI-compatible server serves the same `llm`; the adapter is a model of its own there.",
    ),
    (
        "code",
        """import threading

import httpx
import uvicorn

from jaxllm.serving import create_app
from jaxllm.serving.launch import free_port, wait_until_healthy

url = f"http://127.0.0.1:{free_port()}"
server = uvicorn.Server(
    uvicorn.Config(create_app(llm, served_model_name="smollm2", warmup=False), port=int(url.rsplit(":", 1)[1]))
)
thread = threading.Thread(target=server.run, daemon=True)
thread.start()
wait_until_healthy(url)
print([m["id"] for m in httpx.get(url + "/v1/models").json()["data"]])
body = {"model": "password", "messages": ask, "max_tokens": 32, "temperature": 0}
print(httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]["content"])
server.should_exit = True
thread.join()""",
    ),
]


def build() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    make = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    nb.cells = [make[kind](source) for kind, source in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "docs" / "notebooks" / "quickstart.ipynb"
    nbformat.write(build(), out)
    print(f"wrote {out}")
