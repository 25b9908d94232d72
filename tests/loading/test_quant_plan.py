"""Which params a model keeps quantized: from a GGUF file's tensor types, or from an ISQ scheme."""

from __future__ import annotations

import dataclasses

import pytest

from jaxllm.errors import QuantizationError, UnsupportedModelError
from jaxllm.loading.quant_plan import gguf_plan, isq_plan
from jaxllm.models.registry import describe_params
from jaxllm.quant.isq import parse_scheme
from jaxllm.quant.rows import Format
from tests.test_sharding import LLAMA3_8B

PARAMS = describe_params(LLAMA3_8B)


class TypesOnly:
    """A GGUF file reduced to what planning reads: each tensor's GGML type, by Hugging Face name."""

    def __init__(self, default: str, **by_suffix: str):
        self.default, self.by_suffix = default, by_suffix

    def type_name(self, hf_name: str) -> str:
        if "norm" in hf_name or hf_name.endswith("bias"):
            return "F32"
        return next((t for s, t in self.by_suffix.items() if hf_name.endswith(s)), self.default)


def test_mixed_block_types_share_the_narrowest_exact_format():
    # Q4_K_M-style: most tensors Q4_K, v and down Q6_K in some layers, the embedding Q6_K.
    tied = dataclasses.replace(LLAMA3_8B, tie_word_embeddings=True)
    gguf = TypesOnly("Q4_K", **{"v_proj.weight": "Q6_K", "layers.3.mlp.down_proj.weight": "Q6_K"})
    plan = gguf_plan(gguf, PARAMS, tied)
    assert plan.get(("layers", "attn", "qkv")) == Format("int8", 16, True)  # Q4_K's offsets, Q6_K's groups of 16
    assert plan.get(("layers", "attn", "o")) == Format("uint4", 32, True)
    assert plan.get(("layers", "mlp", "down")) == Format("int8", 16, True)  # one Q6_K layer widens the stack
    assert plan.get(("lm_head",)) is None  # tied: no separate head


def test_a_float_source_mixed_with_blocks_keeps_the_param_float():
    plan = gguf_plan(TypesOnly("Q8_0", **{"up_proj.weight": "F16"}), PARAMS, LLAMA3_8B)
    assert plan.get(("layers", "mlp", "gate_up")) is None
    assert plan.get(("layers", "mlp", "down")) == Format("int8", 32, False)


def test_f16_and_bf16_tensors_stay_in_their_stored_dtype_and_f32_ones_are_float_params():
    plan = gguf_plan(TypesOnly("F16", **{"o_proj.weight": "BF16", "down_proj.weight": "F32"}), PARAMS, LLAMA3_8B)
    assert plan.get(("layers", "attn", "qkv")) == Format("f16", 0, False)
    assert plan.get(("layers", "attn", "o")) == Format("bf16", 0, False)
    assert plan.get(("embed",)) == Format("f16", 0, False)
    assert plan.get(("layers", "mlp", "down")) is None
    mixed = gguf_plan(TypesOnly("F16", **{"v_proj.weight": "BF16"}), PARAMS, LLAMA3_8B)
    assert mixed.get(("layers", "attn", "qkv")) is None  # no one stored dtype holds both exactly


def test_an_unsupported_type_names_the_tensor_and_the_type():
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight has type IQ4_NL"):
        gguf_plan(TypesOnly("Q4_0", **{"q_proj.weight": "IQ4_NL"}), PARAMS, LLAMA3_8B)


def test_isq_leaves_embeddings_float_unless_asked():
    plan = isq_plan(parse_scheme("int8"), PARAMS, LLAMA3_8B)
    assert plan.get(("embed",)) is None and plan.get(("lm_head",)) is None
    assert plan.get(("layers", "mlp", "down")) == Format("int8", 0, False)
    both = isq_plan(parse_scheme("fp8"), PARAMS, LLAMA3_8B, quant_embeddings=True)
    assert both.get(("embed",)) == both.get(("lm_head",)) == Format("fp8", 0, False)


def test_isq_groups_must_divide_every_matmul():
    odd = dataclasses.replace(LLAMA3_8B, intermediate_size=14336 + 64)  # 14400: not a multiple of 128
    with pytest.raises(QuantizationError, match="layers/mlp/down"):
        isq_plan(parse_scheme("int4-g128"), PARAMS, odd)
