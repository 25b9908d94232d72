"""One entry point: a model reference in, a config, params and tokenizer out."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxllm.chat_template import read_template_file
from jaxllm.config import ModelConfig, config_from_gguf_metadata, load_hf_config
from jaxllm.errors import InvalidRequestError
from jaxllm.loading.gguf_file import GGUFFile, gguf_names
from jaxllm.loading.hf_folder import SafetensorsReader
from jaxllm.loading.quant_plan import gguf_plan, isq_plan
from jaxllm.loading.resolve import ModelFiles, resolve_model
from jaxllm.loading.weights import assemble_params
from jaxllm.models import pure
from jaxllm.models.registry import build_model, describe_params, param_shapes
from jaxllm.quant import isq
from jaxllm.quant.plan import QuantPlan
from jaxllm.sharding import Placement, choose_placement, param_shardings, shard_config
from jaxllm.tokenizer import Tokenizer


@dataclasses.dataclass
class LoadedModel:
    """What a loader produces: enough to run and to talk to the model. `quant` names what is stored quantized."""

    name: str
    config: ModelConfig
    model: object
    params: dict
    tokenizer: Tokenizer
    quant: QuantPlan = dataclasses.field(default_factory=QuantPlan)
    placement: Placement | None = None
    dtype: object = jnp.float32  # the float params' and activations' dtype
    folder: Path | None = None  # the Hugging Face folder it was read from (None: a GGUF file)

    @property
    def weight_bytes(self) -> int:
        """Bytes of every param array resident on the device(s)."""
        return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(self.params))

    def forward(self, params, tokens, positions=None, hidden_layers: tuple[int, ...] = (), adapter=None):
        """The model as a pure function of `params` (see `jaxllm.models.pure.forward`): tokens [batch, seq]
        -> logits [batch, seq, vocab], or (logits, hidden [len(hidden_layers), batch, seq, embed]). Jit it
        with `hidden_layers` static; attention runs the differentiable `jax.numpy` reference. adapter: a
        LoRA adapter (`jaxllm.lora.Adapter`) applied to every token."""
        return pure.forward(self._pure_model, params, tokens, positions, hidden_layers, adapter)

    @functools.cached_property
    def _pure_model(self):
        return pure.differentiable(self.model)

    def with_params(self, params) -> LoadedModel:
        """This model with other params of the same structure, shapes and dtypes (edited ones: an ablated
        head, a swapped layer), placed as the loaded params are, for `LLM(loaded=...)`."""
        return dataclasses.replace(self, params=same_layout(self.params, params))


def same_layout(reference, params):
    """`params` placed as `reference` is, after checking that they have its structure, shapes and dtypes
    (`InvalidRequestError` naming the first difference otherwise)."""
    want, got = jax.tree.structure(reference), jax.tree.structure(params)
    if want != got:
        raise InvalidRequestError("params must have the loaded model's structure (edit the arrays, keep the tree)")
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(reference)[0], jax.tree.leaves(params), strict=True):
        if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
            name = jax.tree_util.keystr(path)
            raise InvalidRequestError(
                f"param {name} is {b.dtype}{list(b.shape)}; the model's is {a.dtype}{list(a.shape)}"
            )
    return jax.tree.map(lambda a, b: jax.device_put(b, a.sharding), reference, params)


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """How to store the weights. quant: an ISQ scheme ('int8', 'int4', 'int4-g64', 'int4-asym', 'fp8', ...)
    applied while loading; dequantize: load a GGUF file's quantized tensors as float (by default they are
    kept in their block formats); quant_embeddings: quantize the embedding and LM head too under ISQ."""

    quant: str | None = None
    dequantize: bool = False
    quant_embeddings: bool = False


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """How many devices a model spans: tensor_parallel (None: as many local devices as split its heads)
    and data_parallel replicas."""

    tensor_parallel: int | None = None
    data_parallel: int = 1


def load_model(
    ref=None,
    dtype=jnp.float32,
    chat_template: str | Path | None = None,
    progress: bool = True,
    scan_layers: bool = True,
    options: LoadOptions = LoadOptions(),
    parallel: Parallelism = Parallelism(),
) -> LoadedModel:
    """Load a model from an alias ('smollm2'), a .gguf file, a Hugging Face folder or hub id.

    dtype: the float params' and activations' dtype. scan_layers: stacked params under a layer scan, or
    per-layer params run unrolled (see `jaxllm.models.registry.build_model`). options: quantization
    (`LoadOptions`); a .gguf file is kept quantized unless `options.dequantize` or an ISQ scheme is given.
    parallel: the device layout (`Parallelism`); each param is placed in its sharding as it is read.
    """
    scheme = isq.parse_scheme(options.quant) if options.quant else None
    files = resolve_model(ref)
    if files.kind == "gguf":
        cfg, reader, tok = _open_gguf(files)
    else:
        cfg, reader, tok = _open_hf(files)
    placement = choose_placement(cfg, parallel.tensor_parallel, parallel.data_parallel)
    cfg = shard_config(cfg, placement)
    params_desc = describe_params(cfg)
    read_rows = None
    if scheme is not None:
        plan = isq_plan(scheme, params_desc, cfg, options.quant_embeddings)
        read_rows = lambda name: isq.quantize(reader.read(name), scheme)
    elif files.kind == "gguf" and not options.dequantize:
        plan = gguf_plan(reader, params_desc, cfg)
        read_rows = reader.read_rows
    else:
        plan = QuantPlan()
    model = build_model(cfg, dtype, scan_layers, plan or None)
    shapes = param_shapes(model)
    shardings = param_shardings(shapes, placement) if placement else None
    params = assemble_params(
        cfg, shapes, params_desc, reader.read, dtype, read_rows, progress, f"loading {files.name}", shardings
    )
    if chat_template is not None:
        tok.chat_template = read_template_file(chat_template)
    folder = files.path if files.kind == "hf" else None
    return LoadedModel(files.name, cfg, model, params, tok, plan, placement, dtype, folder)


def _open_hf(files: ModelFiles):
    cfg = load_hf_config(files.path)
    reader = SafetensorsReader(files.path)
    if not reader.has("lm_head.weight") and not cfg.tie_word_embeddings:
        cfg = dataclasses.replace(cfg, tie_word_embeddings=True)
    tok = Tokenizer.from_hf_folder(files.path)
    if tok.eos_id is not None and tok.eos_id not in cfg.eos_token_ids:
        cfg = dataclasses.replace(cfg, eos_token_ids=cfg.eos_token_ids + (tok.eos_id,))
    return cfg, reader, tok


def _open_gguf(files: ModelFiles):
    gguf = GGUFFile(files.path)
    cfg = config_from_gguf_metadata(gguf.metadata)
    gguf.use_names(gguf_names(describe_params(cfg)))
    if not gguf.has("lm_head.weight"):
        cfg = dataclasses.replace(cfg, tie_word_embeddings=True)
    return cfg, gguf, Tokenizer.from_gguf_metadata(gguf.metadata)
