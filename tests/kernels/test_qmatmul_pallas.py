"""The Pallas quantized matmul against the `jax.numpy` reference: interpret mode here, compiled on a GPU.

Weights are random in every kind's full range (uint4 nibbles 0-15, int8 -128..127, fp8 normals) with
scales that keep w around 1, so that tolerances read the same for every kind.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels.qmatmul import reference
from jaxllm.kernels.qmatmul.pallas import pallas_qmatmul
from jaxllm.kernels.qmatmul.tuning import QMatmulBlockSizes, default_block_sizes, num_split_k
from jaxllm.quant.format import QuantizedWeight, pack_uint4

F32_TOL = dict(atol=2e-4, rtol=2e-5)
BF16_TOL = dict(atol=0.15, rtol=2e-2)  # the weight tile is rounded to bf16 before the dot
QMAX = {"int8": 128.0, "uint4": 16.0, "fp8": 2.0, "f16": 2.0, "bf16": 2.0}

SMALL = QMatmulBlockSizes(block_m=16, block_n=32, block_k=64, split_k=2)


def make_weight(seed, kind, n, k, group, offset=True, layers=None):
    """A random `QuantizedWeight` [(layers,) n, k] with groups of `group` along k (group=k: per channel)."""
    rng = np.random.default_rng(seed)
    lead = () if layers is None else (layers,)
    if kind == "int8":
        q = jnp.asarray(rng.integers(-128, 128, (*lead, n, k)), jnp.int8)
    elif kind == "uint4":
        q = jnp.asarray(pack_uint4(rng.integers(0, 16, (*lead, n, k))))
    else:
        dtype = {"fp8": jnp.float8_e4m3fn, "f16": jnp.float16, "bf16": jnp.bfloat16}[kind]
        q = jnp.asarray(rng.standard_normal((*lead, n, k)), dtype)
    groups = (*lead, n, k // group)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, groups) / QMAX[kind], jnp.float32)
    off = jnp.asarray(rng.uniform(-1, 0, groups), jnp.float32) if offset else None
    return QuantizedWeight(q, scale, off, kind, group, (k,), (n,))


def make_x(seed, m, k, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((m, k)), dtype)


def assert_matches(x, w, layer=None, tol=F32_TOL, **kwargs):
    out = pallas_qmatmul(x, w, layer, **kwargs)
    expected = reference.qmatmul(x, w, layer)
    assert out.shape == expected.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), **tol)


@pytest.mark.parametrize("kind", ["int8", "uint4", "fp8"])
@pytest.mark.parametrize("offset", [False, True], ids=["scale", "offset"])
@pytest.mark.parametrize("group", [32, 64, 128, 256], ids=["g32", "g64", "g128", "channel"])
def test_kinds_and_groups(kind, offset, group):
    # block_k 64 against K=256: whole groups per tile (g32, g64) and parts of one group (g128, per channel).
    w = make_weight(0, kind, 32, 256, group, offset)
    assert_matches(make_x(1, 5, 256), w, block_sizes=SMALL, interpret=True)


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_half_weights_kept_as_stored(kind):
    # a GGUF F16/BF16 tensor: one scale per row, no offset
    w = make_weight(2, kind, 32, 256, 256, offset=False, layers=2)
    assert_matches(make_x(3, 5, 256), w, jnp.int32(1), block_sizes=SMALL, interpret=True)


@pytest.mark.parametrize("m", [1, 5, 16, 64])
@pytest.mark.parametrize("kind", ["int8", "uint4"])
def test_rows_with_default_blocks(m, kind):
    w = make_weight(2, kind, 64, 256, 32)
    assert_matches(make_x(3, m, 256), w, interpret=True)


@pytest.mark.parametrize("n,k,group", [(16, 64, 16), (48, 384, 128), (80, 640, 640), (96, 192, 64)])
def test_shapes(n, k, group):
    # N=80, K=640: block_n and block_k shrink to 16 and 128; K=192 takes three 64-wide tiles.
    w = make_weight(4, "uint4", n, k, group)
    blocks = QMatmulBlockSizes(block_m=16, block_n=32, block_k=128)
    assert_matches(make_x(5, 7, k), w, block_sizes=blocks, interpret=True)


@pytest.mark.parametrize("kind", ["int8", "uint4"])
def test_bfloat16_activations(kind):
    w = make_weight(6, kind, 32, 256, 32)
    assert_matches(make_x(7, 5, 256, jnp.bfloat16), w, tol=BF16_TOL, block_sizes=SMALL, interpret=True)


@pytest.mark.parametrize("split_k", [1, 4])
def test_split_k_partials_add_up(split_k):
    w = make_weight(8, "int8", 32, 256, 64)
    blocks = QMatmulBlockSizes(block_m=16, block_n=16, block_k=64, split_k=split_k)
    assert_matches(make_x(9, 3, 256), w, block_sizes=blocks, interpret=True)


@pytest.mark.parametrize("kind", ["int8", "uint4", "fp8"])
def test_stacked_weight_reads_only_its_layer(kind):
    w = make_weight(10, kind, 32, 128, 32, layers=3)
    layer = 1
    keep = (jnp.arange(3) == layer)[:, None, None]
    poisoned = QuantizedWeight(
        jnp.where(keep, w.q, w.q.dtype.type(7) if kind != "fp8" else jnp.nan).astype(w.q.dtype),
        jnp.where(keep, w.scale, jnp.nan),
        jnp.where(keep, w.offset, jnp.nan),
        w.kind,
        w.group,
        w.in_shape,
        w.out_shape,
    )
    x = make_x(11, 5, 128)
    out = pallas_qmatmul(x, poisoned, jnp.int32(layer), block_sizes=SMALL, interpret=True)
    expected = reference.qmatmul(x, w, layer)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), **F32_TOL)


def test_layer_is_traced_not_baked_in():
    w = make_weight(12, "uint4", 32, 128, 64, layers=2)
    x = make_x(13, 2, 128)
    fn = jax.jit(lambda x, w, layer: pallas_qmatmul(x, w, layer, block_sizes=SMALL, interpret=True))
    for layer in (0, 1):
        expected = reference.qmatmul(x, w, layer)
        np.testing.assert_allclose(np.asarray(fn(x, w, jnp.int32(layer))), np.asarray(expected), **F32_TOL)
    assert fn._cache_size() == 1


def test_default_block_sizes_by_rows():
    assert default_block_sizes(1).block_m == 16 and default_block_sizes(16).block_m == 16
    assert default_block_sizes(40).block_m == 64 and default_block_sizes(4096).block_m == 64
    assert num_split_k(64, 16) == 4 and num_split_k(512, 16) == 1 and num_split_k(8, 6) == 2


def _shapes(kind, n, k, group, offset=False, m=1, layers=None, dtype=jnp.bfloat16):
    s = jax.ShapeDtypeStruct
    lead = () if layers is None else (layers,)
    q_dtype = {"int8": jnp.int8, "uint4": jnp.uint8, "fp8": jnp.float8_e4m3fn}[kind]
    groups = s((*lead, n, k // group), jnp.float32)
    w = QuantizedWeight(
        s((*lead, n, k // 2 if kind == "uint4" else k), q_dtype),
        groups,
        groups if offset else None,
        kind,
        group,
        (k,),
        (n,),
    )
    return (s((m, k), dtype), w) if layers is None else (s((m, k), dtype), w, s((), jnp.int32))


@pytest.mark.parametrize(
    "shapes",
    [
        _shapes("int8", 14336, 4096, 32, m=1),
        _shapes("uint4", 4096, 14336, 128, offset=True, m=16, layers=32),
        _shapes("uint4", 14336, 4096, 32, m=256),
        _shapes("uint4", 4096, 4096, 16, offset=True, m=3),
        _shapes("int8", 1024, 4096, 4096, offset=True, m=300, layers=2, dtype=jnp.float32),
        _shapes("fp8", 4096, 4096, 128, m=7),
    ],
    ids=["int8-decode", "uint4-stacked", "uint4-prefill", "uint4-g16", "int8-channel-f32", "fp8"],
)
def test_lowers_to_triton(shapes):
    """The Triton lowering (Pallas to Triton IR) runs on any host, so power-of-two and op mistakes surface
    here; compiling that IR to PTX and running it still needs the GPU tests below."""
    lowered = jax.jit(lambda *a: pallas_qmatmul(*a)).trace(*shapes).lower(lowering_platforms=("cuda",))
    assert "xla.gpu.triton" in lowered.as_text()


@pytest.mark.parametrize(
    "shapes,match",
    [
        (_shapes("int8", 40, 256, 32), "block_n"),  # N=40: the largest dividing block is 8
        (_shapes("uint4", 64, 48, 16), "dot_k"),  # K=48: block_k 16, i.e. dots 8 wide
        ((jax.ShapeDtypeStruct((4, 256), jnp.float32), _shapes("int8", 64, 96, 32)[1]), "K=96"),  # x is K=256
    ],
    ids=["n40", "uint4-k48", "k-mismatch"],
)
def test_shapes_triton_cannot_take_raise_while_tracing(shapes, match):
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda *a: pallas_qmatmul(*a), *shapes)


def test_a_layer_needs_a_stack():
    x, w = _shapes("int8", 64, 256, 32)
    with pytest.raises(ValueError, match="q \\[L, N"):
        jax.eval_shape(lambda x, w: pallas_qmatmul(x, w, 0, interpret=True), x, w)


# --- compiled on a GPU: Llama-3-8B shapes, bf16 (and f32 at full matmul precision) -------------------------

gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU backend")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind,group", [("int8", 32), ("uint4", 32), ("uint4", 128), ("fp8", 4096)])
@pytest.mark.parametrize("m", [1, 16, 300])
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336)])
def test_gpu_llama_shapes(kind, group, m, n, k):
    w = make_weight(20, kind, n, k, group, offset=kind == "uint4")
    tol = dict(atol=0.5, rtol=2e-2)  # K up to 14336 terms of bf16-rounded weights
    assert_matches(make_x(21, m, k, jnp.bfloat16), w, tol=tol)


@pytest.mark.gpu
@gpu
def test_gpu_stacked_float32():
    w = make_weight(22, "uint4", 1024, 2048, 64, layers=4)
    x = make_x(23, 5, 2048)
    out = pallas_qmatmul(x, w, jnp.int32(2))
    with jax.default_matmul_precision("highest"):
        expected = reference.qmatmul(x, w, 2)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-3, rtol=1e-4)
