"""Block sizes of the Pallas attention kernels, kept as data so that tuning never touches kernel code.

The defaults are first guesses for an H100 with bf16 and head_dim 64-128, not measurements:
`scripts/kernel_bench.py --sweep` times the alternatives on a GPU. On the GPU (Triton) every block
dimension that reaches a `dot` must be a power of two and at least 16; interpret mode accepts any.
"""

from __future__ import annotations

import dataclasses


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    """Tiles of `paged_decode_attention`.

    pages_per_block: cache pages read per step of the online softmax; pages_per_block * page_size keys
    form one compute block (>= 16 and a power of two on the GPU).
    num_splits: programs sharing one (row, kv head), each taking an equal share of the row's context
    ("flash decoding"), merged in the wrapper; None picks `decode_num_splits` from the batch, kv heads
    and table length.
    num_warps, num_stages: Triton launch parameters.
    """

    pages_per_block: int = 8
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class PrefillBlockSizes:
    """Tiles of `flash_prefill_attention`.

    block_q: new tokens per program; block_k: keys per step, for the new tokens and for the cached
    context alike (the context block is max(1, block_k // page_size) whole pages). Powers of two,
    >= 16 on the GPU; the wrapper shrinks block_q for short prompts.
    num_warps, num_stages: Triton launch parameters.
    """

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2


DEFAULT_DECODE = DecodeBlockSizes()
DEFAULT_PREFILL = PrefillBlockSizes()

# Programs that keep an H100's 132 SMs busy with a couple of resident programs each.
TARGET_PROGRAMS = 256


def decode_num_splits(batch: int, kv_heads: int, n_blocks: int, target_programs: int = TARGET_PROGRAMS) -> int:
    """Context splits per (row, kv head): a power of two, enough for `target_programs`, at most `n_blocks`.

    Small batches with long contexts otherwise leave most SMs idle; splits cost one extra merge of
    [batch, kv_heads, splits, group, head_dim] float32 partial outputs. Each split takes an equal share
    of its row's actual context (computed in the kernel), so short rows in long tables stay balanced.
    """
    want = next_power_of_2(max(1, -(-target_programs // max(1, batch * kv_heads))))
    return max(1, min(want, n_blocks, 64))
