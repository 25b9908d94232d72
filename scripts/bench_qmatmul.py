"""The quantized matmul on the CPU: the native kernel against the reference (dequantize + dot) and a float32 dot.

SmolLM2-135M shapes, each stacked over `--layers` layers (the LM head over 3 copies) and run as a layer
scan that reads layer i of the stack, as a model step does, so that the weights stream from memory rather
than from cache. Prints a markdown table of the median time per matmul after warm-up and the weight bytes
read per second (quantized bytes for native and reference; float32 bytes for the float dot). "int8 act" is
the native kernel with `int8_activations=True` (x quantized per 32-block, integer dot products; the same
as native for fp8, which keeps the float math). The machine may be shared and noisy: each figure is the
best of `--rounds` medians, the implementations alternating.

    python scripts/bench_qmatmul.py [--batches 1,8,32] [--layers 30] [--reps 7] [--rounds 3] [--no-reference]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.kernels.qmatmul import native
from jaxllm.kernels.qmatmul.reference import qmatmul as reference
from jaxllm.quant.format import QuantizedWeight, pack_uint4

SHAPES = {  # name: (K, N)
    "qkv 576x1728": (576, 1728),
    "gate_up 576x3072": (576, 3072),
    "down 1536x576": (1536, 576),
    "o 576x576": (576, 576),
    "lm_head 576x49152": (576, 49152),
}
FORMATS = {  # name: (kind, group or None for per-channel, offset)
    "uint4 g32 +offset (Q4_1)": ("uint4", 32, True),
    "int8 g32 (Q8_0)": ("int8", 32, False),
    "int8 per-channel": ("int8", None, False),
    "fp8 per-channel": ("fp8", None, False),
}


def make_weight(rng, kind, group, offset, layers, n, k) -> QuantizedWeight:
    group = group or k
    if kind == "uint4":
        q = pack_uint4(rng.integers(0, 16, (layers, n, k), dtype=np.uint8))
    elif kind == "int8":
        q = rng.integers(-128, 128, (layers, n, k), dtype=np.int8)
    else:
        q = (rng.standard_normal((layers, n, k), dtype=np.float32) * 8).astype(jnp.float8_e4m3fn)
    scale = rng.uniform(0.001, 0.01, (layers, n, k // group)).astype(np.float32)
    off = rng.uniform(-0.05, 0.05, scale.shape).astype(np.float32) if offset else None
    arrays = [jnp.asarray(a) if a is not None else None for a in (q, scale, off)]
    return QuantizedWeight(*arrays, kind, group, (k,), (n,))


def scan_layers(matmul, layers):
    """A jitted f(x, w) summing matmul(x, w, i) over the layers, so each call streams the whole stack."""

    def f(x, w):
        def body(acc, i):
            return acc + matmul(x, w, i)[:, :1].sum(), None

        return jax.lax.scan(body, jnp.float32(0), jnp.arange(layers, dtype=jnp.int32))[0]

    return jax.jit(f)


def median_per_layer(fn, args, layers, reps) -> float:
    """Median seconds per layer over `reps` calls."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times) / layers


def best_medians(calls: dict, layers, reps, rounds) -> dict:
    """{name: best of `rounds` medians} for {name: (fn, args)}, after two warm-up calls each."""
    for fn, args in calls.values():
        for _ in range(2):
            jax.block_until_ready(fn(*args))
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, (fn, args) in calls.items():
            best[name] = min(best[name], median_per_layer(fn, args, layers, reps))
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 32])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shapes", type=lambda s: s.split(","), default=list(SHAPES), help="name prefixes")
    p.add_argument("--formats", type=lambda s: s.split(","), default=list(FORMATS), help="name prefixes")
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) dequantize-then-dot reference")
    args = p.parse_args(argv)
    if not native.available():
        raise SystemExit("the native kernel is unavailable here")
    rng = np.random.default_rng(0)
    head = ["shape", "format", "M", "native µs", "GB/s", "int8 act µs", "GB/s", "reference µs", "GB/s"]
    head += ["f32 dot µs", "GB/s", "native vs f32", "int8 act vs f32", "int8 act vs native"]
    print("| " + " | ".join(head) + " |")
    print("|---|---|" + "---:|" * (len(head) - 2))
    for shape, (k, n) in SHAPES.items():
        if not any(shape.startswith(s) for s in args.shapes):
            continue
        layers = 3 if shape.startswith("lm_head") else args.layers
        dense = jnp.asarray(rng.standard_normal((layers, n, k), dtype=np.float32))
        f32 = scan_layers(lambda x, w, i: x @ w[i].T, layers)
        f32_times = {}
        for fmt, (kind, group, offset) in FORMATS.items():
            if not any(fmt.startswith(s) for s in args.formats):
                continue
            w = make_weight(rng, kind, group, offset, layers, n, k)
            qbytes = w.nbytes / layers
            int8_act = functools.partial(native.native_qmatmul, int8_activations=True)
            fns = {"native": scan_layers(functools.partial(native.native_qmatmul, int8_activations=False), layers)}
            if kind != "fp8":
                fns["int8 act"] = scan_layers(int8_act, layers)
            if not args.no_reference:
                fns["reference"] = scan_layers(reference, layers)
            for m in args.batches:
                x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
                calls = {name: (fn, (x, w)) for name, fn in fns.items()}
                calls["f32"] = (f32, (x, dense))
                t = best_medians(calls, layers, args.reps, args.rounds)
                tf = f32_times[m] = min(t["f32"], f32_times.get(m, float("inf")))
                cells = []
                for name in ("native", "int8 act", "reference"):
                    cells += [f"{t[name] * 1e6:.0f}", f"{qbytes / t[name] / 1e9:.1f}"] if name in t else ["–", "–"]
                cells += [f"{tf * 1e6:.0f}", f"{n * k * 4 / tf / 1e9:.1f}", f"{tf / t['native']:.2f}x"]
                cells += (
                    [f"{tf / t['int8 act']:.2f}x", f"{t['native'] / t['int8 act']:.2f}x"]
                    if "int8 act" in t
                    else ["–"] * 2
                )
                print(f"| {shape} | {fmt} | {m} | " + " | ".join(cells) + " |", flush=True)
        del dense
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
