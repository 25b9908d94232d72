"""Block sizes of the Pallas quantized matmul, kept as data so that tuning never touches kernel code.

The defaults are first guesses for an H100/H200 with bf16 activations, not measurements: time them with
`scripts/kernel_bench.py` on a GPU before trusting them. Decode (M <= 16) is a matrix-vector product
bound by reading the weights, so it wants many programs streaming long K strips (split K); prefill is a
real GEMM and wants square-ish tiles that reuse each dequantized weight tile across many rows.
On the GPU (Triton) every block dimension that reaches a `dot` must be a power of two >= 16.
"""

from __future__ import annotations

import dataclasses


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class QMatmulBlockSizes:
    """Tiles of `pallas_qmatmul`.

    block_m: rows of x per program (M is padded to a multiple; >= 16 on the GPU).
    block_n, block_k: output features per program and K values per step, both upper bounds: the wrapper
    halves them until they divide N and K (and block_k fits the quantization group). For uint4 the dots
    see block_k // 2, which must still be >= 16 on the GPU.
    split_k: programs sharing one output tile, each summing an equal share of K, added up in the wrapper;
    None picks `num_split_k` from the grid size.
    num_warps, num_stages: Triton launch parameters.
    """

    block_m: int = 16
    block_n: int = 64
    block_k: int = 256
    split_k: int | None = None
    num_warps: int = 4
    num_stages: int = 3


DECODE = QMatmulBlockSizes(block_m=16, block_n=64, block_k=256, split_k=None, num_warps=4, num_stages=3)
PREFILL = QMatmulBlockSizes(block_m=64, block_n=128, block_k=64, split_k=1, num_warps=4, num_stages=3)

# Programs that keep an H100's 132 SMs (H200: 132 too) busy with a couple of resident programs each.
TARGET_PROGRAMS = 256


def default_block_sizes(m: int) -> QMatmulBlockSizes:
    """Tiles for x with `m` rows: `DECODE` up to 16 rows, else `PREFILL` with block_m shrunk to fit m."""
    if m <= DECODE.block_m:
        return DECODE
    return dataclasses.replace(PREFILL, block_m=min(PREFILL.block_m, next_power_of_2(m)))


def num_split_k(programs: int, k_tiles: int, target_programs: int = TARGET_PROGRAMS) -> int:
    """Splits of K per output tile: a power of two dividing `k_tiles`, enough for `target_programs`.

    Decode with N = 4096 has only 64 output tiles of 64 features: without splits most SMs idle while
    the weights stream. Each split costs one [M, N] float32 partial output, summed in the wrapper.
    """
    want = next_power_of_2(max(1, -(-target_programs // max(1, programs))))
    split = 1
    while split * 2 <= want and k_tiles % (split * 2) == 0:
        split *= 2
    return split
