"""Command-line options shared by every command that loads a model: how its weights are stored, and over
how many devices."""

from __future__ import annotations

import argparse

from jaxllm.errors import QuantizationError


def _scheme(text: str) -> str:
    from jaxllm.quant.isq import parse_scheme

    try:
        parse_scheme(text)
    except QuantizationError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_quant_arguments(p: argparse.ArgumentParser) -> None:
    """--quant, --dequantize and --quant-embeddings."""
    p.add_argument(
        "--quant",
        type=_scheme,
        default=None,
        metavar="Q",
        help="quantize float weights while loading: int8, fp8, int4 (group 32), int4-g64, int4-g128, int4-sym",
    )
    p.add_argument(
        "--dequantize",
        action="store_true",
        help="load a .gguf file's quantized tensors as float (by default they stay in their block formats)",
    )
    p.add_argument("--quant-embeddings", action="store_true", help="with --quant, quantize the embedding/LM head too")


def load_options(args: argparse.Namespace):
    """The `LoadOptions` the quantization flags ask for (with --quant, --dequantize changes nothing: ISQ reads
    the float weights anyway)."""
    from jaxllm.loading.load import LoadOptions

    return LoadOptions(args.quant, args.dequantize, args.quant_embeddings)


def positive(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    """--tensor-parallel and --data-parallel."""
    p.add_argument(
        "--tensor-parallel",
        type=positive,
        default=None,
        metavar="N",
        help="split the model over N devices (default: as many local devices as split its heads; 1: one device)",
    )
    p.add_argument("--data-parallel", type=positive, default=1, metavar="M", help="model replicas (default 1)")


def parallelism(args: argparse.Namespace):
    """The `Parallelism` the device flags ask for."""
    from jaxllm.loading.load import Parallelism

    return Parallelism(args.tensor_parallel, args.data_parallel)
