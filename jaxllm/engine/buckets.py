"""Shape buckets, computed in one place, so that the number of compiled variants stays bounded."""

from __future__ import annotations


def next_pow2(n: int, minimum: int = 1) -> int:
    b = minimum
    while b < n:
        b *= 2
    return b


def seq_bucket(n: int, max_len: int, minimum: int = 16) -> int:
    """Prompt-length bucket: the power of two >= n (at least `minimum`), capped at max_len."""
    return min(next_pow2(n, minimum), max_len)


def seq_buckets(max_len: int, minimum: int = 16) -> list[int]:
    """Every prompt-length bucket up to max_len."""
    out, b = [], minimum
    while b < max_len:
        out.append(b)
        b *= 2
    return out + [max_len]


def token_bucket(n: int, minimum: int = 16, step: int = 256) -> int:
    """Flat token-count bucket of a mixed step: the power of two >= n (at least `minimum`) up to `step`, then
    the next multiple of `step` (a chunk of 256 beside a few decodes pads to 512, not 1024)."""
    return next_pow2(n, minimum) if n <= step else -(-n // step) * step


def attn_bucket(n: int, max_len: int, minimum: int = 64) -> int:
    """How many cache slots a decode step attends to: the power of two >= n (>= minimum), <= max_len."""
    return min(next_pow2(n, minimum), max_len)


def batch_bucket(n: int, max_rows: int) -> int:
    """Batch-size bucket: the power of two >= n, capped at max_rows."""
    return min(next_pow2(n), max_rows)
