"""Typed errors. Each carries a one-line message that says what is wrong and what to do.

The CLI prints the message and exits 2; the server (later) maps each type to one HTTP status.
"""


class JaxLLMError(Exception):
    """Base class of every error jaxllm raises on purpose; `param` names the offending field, if any."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ModelNotFoundError(JaxLLMError):
    """A model reference (path, hub id, alias) resolves to nothing."""


class ModelLoadError(JaxLLMError):
    """A model's files exist but cannot be read: corrupt, truncated or inconsistent."""


class UnsupportedModelError(JaxLLMError):
    """The architecture, rope type, GGUF tensor type or tokenizer kind is not supported."""


class TokenizerError(JaxLLMError):
    """No tokenizer or chat template could be built or rendered."""


class ContextLengthError(JaxLLMError):
    """A prompt (plus what is asked to generate) does not fit the model's context."""


class InvalidSamplingParamsError(JaxLLMError, ValueError):
    """A sampling parameter is out of range."""


class InvalidRequestError(JaxLLMError, ValueError):
    """A request is malformed (bad JSONL line, unknown field, wrong type)."""


class QueueFullError(JaxLLMError):
    """The waiting queue is at its limit (--max-waiting): retry later."""


class EngineShutdownError(JaxLLMError):
    """The engine is shutting down and admits no new requests."""


class ModelMismatchError(JaxLLMError):
    """A request names a model this server does not serve."""


class QuantizationError(JaxLLMError, ValueError):
    """A quantization scheme is unknown or cannot apply to this model's weights."""


class PlacementError(JaxLLMError, ValueError):
    """A tensor- or data-parallel layout the model's heads or the available devices cannot take."""


class DistributedError(JaxLLMError):
    """A process of a multi-process group died or stopped answering: the group cannot continue."""
