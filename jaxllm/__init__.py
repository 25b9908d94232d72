"""jaxllm: a JAX/XLA inference engine for large language models.

from jaxllm import LLM, SamplingParams
llm = LLM("smollm2")
print(llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=32))[0].outputs[0].text)
"""

from jaxllm.errors import (
    ContextLengthError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    JaxLLMError,
    ModelLoadError,
    ModelNotFoundError,
    TokenizerError,
    UnsupportedModelError,
)
from jaxllm.outputs import CompletionOutput, RequestOutput, StreamDelta, Usage
from jaxllm.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "load",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "StreamDelta",
    "Usage",
    "JaxLLMError",
    "ContextLengthError",
    "InvalidRequestError",
    "InvalidSamplingParamsError",
    "ModelLoadError",
    "ModelNotFoundError",
    "TokenizerError",
    "UnsupportedModelError",
]


def __getattr__(name: str):
    """`LLM` and `load` are imported on first use, so that `jaxllm.kernels` and friends load without the engine's
    dependencies (loaders, tokenizers), e.g. on a bare GPU machine."""
    if name in ("LLM", "load"):
        from jaxllm import api

        return getattr(api, name)
    raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")
