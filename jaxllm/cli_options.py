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
    p.add_argument(
        "--data-parallel",
        type=positive,
        default=1,
        metavar="M",
        help="M replicas of the model, each over its N devices with its share of the batch and KV cache (default 1)",
    )


def parallelism(args: argparse.Namespace):
    """The `Parallelism` the device flags ask for."""
    from jaxllm.loading.load import Parallelism

    return Parallelism(args.tensor_parallel, args.data_parallel)


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    """--coordinator-address, --num-processes and --process-id (a group of processes over several hosts)."""
    p.add_argument(
        "--coordinator-address",
        default=None,
        metavar="HOST:PORT",
        help="join a multi-process group whose process 0 listens here (every process runs the same command)",
    )
    p.add_argument("--num-processes", type=positive, default=None, metavar="N", help="processes in the group")
    p.add_argument(
        "--process-id",
        type=int,
        default=None,
        metavar="I",
        help="this process's index: 0 leads (schedules, serves), the others follow its steps",
    )


def cluster(args: argparse.Namespace):
    """The `Cluster` the flags describe, or None without --coordinator-address."""
    from jaxllm.distributed import Cluster
    from jaxllm.errors import PlacementError

    if args.coordinator_address is None:
        if args.num_processes is not None or args.process_id is not None:
            raise PlacementError("--num-processes and --process-id need --coordinator-address HOST:PORT")
        return None
    if args.num_processes is None or args.process_id is None:
        raise PlacementError("--coordinator-address needs --num-processes N and --process-id I")
    return Cluster(args.coordinator_address, args.num_processes, args.process_id)
