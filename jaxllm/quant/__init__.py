"""Quantized weights: formats as pytrees, GGUF block repacking, in-situ quantization, and the matmul seam."""

from jaxllm.quant.format import QuantizedWeight
from jaxllm.quant.matmul import Lora, einsum, take
from jaxllm.quant.plan import QuantPlan

__all__ = ["Lora", "QuantPlan", "QuantizedWeight", "einsum", "take"]
