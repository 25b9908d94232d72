"""jaxllm: a JAX/XLA inference engine for large language models.

from jaxllm import LLM, SamplingParams
llm = LLM("smollm2")
print(llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=32))[0].outputs[0].text)
"""

from jaxllm.api import LLM
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
