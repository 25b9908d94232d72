"""The native CPU quantized matmul (C++ through XLA FFI) against the `jax.numpy` reference.

Built here with the machine's C++ compiler, as on first use. Random weights of every kind, with and
without offset, over group sizes, batch sizes and odd output sizes; stacked weights are read at a layer
with the other layers poisoned with NaN.
"""

from __future__ import annotations

import ctypes
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels import native_build
from jaxllm.kernels.qmatmul import native
from jaxllm.kernels.qmatmul.reference import qmatmul as reference
from jaxllm.quant.format import QuantizedWeight, pack_uint4

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel")

KINDS = ("int8", "uint4", "fp8")
HALF_KINDS = {"f16": np.float16, "bf16": jnp.bfloat16}
TOL = 1e-5


def make_weight(seed, kind, n, k, group, offset=True, layers=None) -> QuantizedWeight:
    rng = np.random.default_rng(seed)
    lead = () if layers is None else (layers,)
    if kind == "int8":
        q = rng.integers(-128, 128, (*lead, n, k), dtype=np.int8)
    elif kind == "uint4":
        q = pack_uint4(rng.integers(0, 16, (*lead, n, k)))
    elif kind in HALF_KINDS:  # a stored GGUF F16/BF16 tensor: group K, no offset
        q = rng.standard_normal((*lead, n, k)).astype(HALF_KINDS[kind])
    else:  # every finite e4m3fn value, NaN excluded
        bits = rng.integers(0, 256, (*lead, n, k), dtype=np.uint8)
        bits[(bits & 0x7F) == 0x7F] &= 0xF0
        q = bits.view(jnp.float8_e4m3fn)
    scale = rng.uniform(0.01, 0.1, (*lead, n, k // group)).astype(np.float32)
    off = rng.uniform(-0.5, 0.5, (*lead, n, k // group)).astype(np.float32) if offset else None
    return QuantizedWeight(
        jnp.asarray(q), jnp.asarray(scale), None if off is None else jnp.asarray(off), kind, group, (k,), (n,)
    )


def make_x(seed, m, k):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((m, k)), jnp.float32)


def assert_close(out, expected, x, w):
    """Within TOL of the reference, relative to the size of the terms summed (sum_k |x| |w|)."""
    out, expected = np.asarray(out), np.asarray(expected)
    assert out.shape == expected.shape and out.dtype == np.float32
    bound = np.abs(np.asarray(x)) @ np.abs(np.asarray(w.dequantize())).T
    np.testing.assert_array_less(np.abs(out - expected), TOL * bound + 1e-30)


def test_it_builds_and_registers_here():
    assert native.available()
    assert native.build().exists()  # a second build finds the first one's library


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offset", [True, False], ids=["offset", "no-offset"])
@pytest.mark.parametrize("group", [16, 32, 64, 128, "K"])
@pytest.mark.parametrize("m", [1, 3, 6, 8, 32, 64])
def test_matches_reference(kind, offset, group, m):
    for n, k in ((7, 256), (100, 640 if group != "K" else 600)):  # K=600: per-channel with a partial vector
        g = k if group == "K" else group
        w = make_weight(hash((kind, offset, g, m, n)) % 2**32, kind, n, k, g, offset)
        x = make_x(m, m, k)
        assert_close(native.native_qmatmul(x, w), reference(x, w), x, w)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [1, 8])
def test_reads_the_given_layer_of_the_stack_under_jit(kind, m):
    w = make_weight(1, kind, 37, 1536, 32, offset=True, layers=3)
    nan_q = {"int8": 0, "uint4": 0, "fp8": jnp.nan}[kind]
    poison = lambda a, v: a.at[0].set(v).at[2].set(v)  # layers 0 and 2: NaN scale and offset
    stacked = QuantizedWeight(
        poison(w.q, nan_q), poison(w.scale, jnp.nan), poison(w.offset, jnp.nan), kind, 32, (1536,), (37,)
    )
    x = make_x(2, m, 1536)
    out = jax.jit(native.native_qmatmul)(x, stacked, jnp.int32(1))
    assert np.isfinite(np.asarray(out)).all()
    one = jax.tree.map(lambda a: a[1], w)
    assert_close(out, reference(x, one), x, one)
    np.testing.assert_array_equal(out, native.native_qmatmul(x, one))  # same math stacked or not


def test_the_lm_head_shape_and_a_scan_over_layers():
    w = make_weight(3, "uint4", 1000, 576, 32, layers=4)
    x = make_x(4, 5, 576)

    def step(x, w):
        return jax.lax.scan(
            lambda c, i: (c + native.native_qmatmul(x, w, i)[:, :576], None), jnp.zeros((5, 576)), jnp.arange(4)
        )[0]

    out = jax.jit(step)(x, w)
    expected = sum(reference(x, w, i)[:, :576] for i in range(4))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_fp8_nan_and_subnormals_decode_as_in_the_reference():
    bits = np.arange(256, dtype=np.uint8).reshape(1, 256)
    w = QuantizedWeight(
        jnp.asarray(bits.view(jnp.float8_e4m3fn)), jnp.ones((1, 16), jnp.float32), None, "fp8", 16, (256,), (1,)
    )
    for k in range(0, 256, 16):
        x = jnp.zeros((1, 256), jnp.float32).at[0, k : k + 16].set(2.0 ** np.arange(16, dtype=np.float32))
        np.testing.assert_allclose(native.native_qmatmul(x, w), reference(x, w), rtol=1e-6, equal_nan=True)
    x = jnp.ones((1, 256), jnp.float32).at[0, 127].set(0).at[0, 255].set(0)
    assert np.isnan(native.native_qmatmul(jnp.ones((1, 256)), w)).all()


@pytest.mark.parametrize("kind", HALF_KINDS)
@pytest.mark.parametrize("m", [1, 3, 8, 32, 64])
def test_half_weights_match_reference(kind, m):
    for n, k in ((7, 256), (100, 600)):
        w = make_weight(hash((kind, m, n)) % 2**32, kind, n, k, k, offset=False)
        x = make_x(m, m, k)
        assert_close(native.native_qmatmul(x, w), reference(x, w), x, w)
    stacked = make_weight(5, kind, 37, 576, 576, offset=False, layers=3)
    out = jax.jit(native.native_qmatmul)(make_x(6, m, 576), stacked, jnp.int32(2))
    one = jax.tree.map(lambda a: a[2], stacked)
    np.testing.assert_array_equal(out, native.native_qmatmul(make_x(6, m, 576), one))


@pytest.mark.parametrize("kind", HALF_KINDS)
def test_every_finite_half_value_decodes_exactly_and_inf_and_nan_carry(kind):
    bits = np.arange(2**16, dtype=np.uint16)
    values = bits.view(HALF_KINDS[kind])
    f32 = values.astype(np.float32)
    # float32 subnormals (bf16's smallest values) are flushed to zero by XLA:CPU's float mode, as in the reference
    finite = values[np.isfinite(f32) & ((np.abs(f32) >= np.finfo(np.float32).tiny) | (f32 == 0))]
    finite = finite[: len(finite) // 16 * 16].reshape(-1, 16)  # [rows, 16]: each row of w one-hot read
    w = QuantizedWeight(
        jnp.asarray(finite), jnp.ones((len(finite), 1), jnp.float32), None, kind, 16, (16,), (len(finite),)
    )
    out = native.native_qmatmul(jnp.eye(16, dtype=jnp.float32), w)  # [16, rows] = w transposed
    np.testing.assert_array_equal(np.asarray(out), finite.astype(np.float32).T)
    special = np.ones((3, 16), np.float32)
    special[0, 5], special[1, 9], special[2, 0] = np.inf, -np.inf, np.nan
    w = QuantizedWeight(
        jnp.asarray(special.astype(HALF_KINDS[kind])), jnp.ones((3, 1), jnp.float32), None, kind, 16, (16,), (3,)
    )
    out = np.asarray(native.native_qmatmul(jnp.ones((1, 16), jnp.float32), w))
    assert out[0, 0] == np.inf and out[0, 1] == -np.inf and np.isnan(out[0, 2])


def test_the_portable_path_matches_too():
    """Built without AVX-512, the kernel takes its plain C++ path; same cases, same answers."""
    flags = [*native_build.FLAGS, "-mno-avx512f"]
    lib = ctypes.cdll.LoadLibrary(str(native_build.build(native.SOURCE, "native_qmatmul_portable", flags)))
    jax.ffi.register_ffi_target("jaxllm_qmatmul_portable", jax.ffi.pycapsule(lib.JaxllmQMatmulF32), platform="cpu")
    for i, (kind, offset, group, m) in enumerate(
        [
            ("int8", False, 32, 3),
            ("uint4", True, 32, 8),
            ("fp8", True, 600, 1),
            ("f16", False, 600, 3),
            ("bf16", False, 640, 1),
        ]
    ):
        w = make_weight(20 + i, kind, 9, 600 if group == 600 else 640, group, offset)
        x = make_x(21 + i, m, w.k)
        assert_close(native._call("jaxllm_qmatmul_portable", x, w, None), reference(x, w), x, w)


def test_the_build_key_covers_every_header_the_source_includes(tmp_path, monkeypatch):
    """The key is in the library's name: an edited header gives another name, so a rebuild."""
    names = {path.name for path in native_build.local_sources(native.SOURCE)}
    assert names == {f"native_qmatmul{s}" for s in (".cc", "_bf16.h", "_common.h", "_float.h", "_int8.h", "_threads.h")}
    for name in names:
        (tmp_path / name).write_text((native.SOURCE.parent / name).read_text())
    built = []

    def fake_compile(cmd, **kwargs):
        built.append(cmd[-1])
        open(cmd[-1], "w").close()
        return native_build.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(native_build, "build_dir", lambda: tmp_path)
    monkeypatch.setattr(native_build.subprocess, "run", fake_compile)
    source = tmp_path / "native_qmatmul.cc"
    first = native_build.build(source, "k", compiler="c++")
    assert native_build.build(source, "k", compiler="c++") == first and len(built) == 1
    header = tmp_path / "native_qmatmul_float.h"
    header.write_text(header.read_text() + "\n// edited\n")
    assert native_build.build(source, "k", compiler="c++") != first and len(built) == 2


def test_calls_from_two_python_threads_at_once_give_each_its_own_answer():
    """Two threads dispatch at once: the helpers serve one call at a time, and no call waits on the other's."""
    ws = [make_weight(40 + i, kind, 1000, 576, 32, offset=i == 0) for i, kind in enumerate(("uint4", "int8"))]
    xs = [make_x(41 + i, m, 576) for i, m in enumerate((1, 5))]
    fns = [jax.jit(lambda x, w: native.native_qmatmul(x, w)) for _ in ws]
    expected = [np.asarray(fn(x, w)) for fn, x, w in zip(fns, xs, ws, strict=True)]
    for x, w, e in zip(xs, ws, expected, strict=True):
        assert_close(e, reference(x, w), x, w)
    results = [[], []]

    def loop(i):
        for _ in range(100):
            results[i].append(np.asarray(fns[i](xs[i], ws[i])))

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    for i in range(2):
        assert len(results[i]) == 100
        for r in results[i]:
            np.testing.assert_array_equal(r, expected[i])


def test_many_independent_calls_in_one_step_do_not_deadlock_the_thread_pool():
    """XLA may run independent kernels at once on its pool; each must finish without waiting for a helper."""
    ws = [make_weight(10 + i, "uint4", 300, 576, 32) for i in range(12)]
    x = make_x(11, 8, 576)
    out = jax.jit(lambda x, ws: sum(native.native_qmatmul(x, w) for w in ws))(x, ws)
    np.testing.assert_allclose(out, sum(reference(x, w) for w in ws), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, w: (x.astype(jnp.bfloat16), w), "float32"),
        (lambda x, w: (x[None], w), "float32"),
        (lambda x, w: (x[:, :32], w), "K=32"),
        (lambda x, w: (x, QuantizedWeight(w.q, w.scale[:, ::2], None, w.kind, 8, w.in_shape, w.out_shape)), "group"),
        (lambda x, w: (x, QuantizedWeight(w.q.astype(jnp.int8), w.scale, None, "uint4", 16, (64,), (4,))), "kinds"),
        (lambda x, w: (x, QuantizedWeight(w.q, w.scale.astype(jnp.bfloat16), None, "int8", 16, (64,), (4,))), "scale"),
    ],
)
def test_what_it_does_not_take_raises_value_error_while_tracing(change, match):
    x, w = make_x(5, 2, 64), make_weight(6, "int8", 4, 64, 16, offset=False)
    x, w = change(x, w)
    with pytest.raises(ValueError, match=match):
        jax.jit(native.native_qmatmul).lower(x, w)


# The integer path (int8_activations): x quantized per 32-block to int8 as Q8_0, integer dot products.

INT_KINDS = ("uint4", "int8")


def q8_blocks(x) -> tuple[np.ndarray, np.ndarray]:
    """x [M, K] -> (x^ [M, K], absmax [M, blocks]): Q8_0 of each 32-block (the last one zero-padded)."""
    x = np.asarray(x, np.float32)
    m, k = x.shape
    blocks = -(-k // 32)
    b = np.pad(x, ((0, 0), (0, blocks * 32 - k))).reshape(m, blocks, 32)
    absmax = np.abs(b).max(-1)
    with np.errstate(divide="ignore"):
        inv = np.where(absmax > 0, np.float32(127) / absmax, np.float32(0)).astype(np.float32)
    x_hat = np.rint(b * inv[..., None]) * (absmax / np.float32(127))[..., None]
    return x_hat.reshape(m, -1)[:, :k].astype(np.float32), absmax


def assert_within_int8_bound(out, expected, x, w):
    """|out - expected| <= sum_b (absmax_b / 254) sum_{k in b} |w[n, k]|, plus TOL of sum_k |x| |w| for float
    rounding; also equal (to TOL) to the reference run on x quantized per block in numpy."""
    out, expected = np.asarray(out), np.asarray(expected)
    assert out.shape == expected.shape and out.dtype == np.float32
    w_abs = np.abs(np.asarray(w.dequantize()))
    x_hat, absmax = q8_blocks(x)
    blocks = absmax.shape[1]
    w_blocks = np.pad(w_abs, ((0, 0), (0, blocks * 32 - w.k))).reshape(w_abs.shape[0], blocks, 32).sum(-1)
    rounding = TOL * (np.abs(np.asarray(x)) @ w_abs.T) + 1e-30
    np.testing.assert_array_less(np.abs(out - expected), (absmax / 254) @ w_blocks.T + rounding)
    np.testing.assert_array_less(np.abs(out - np.asarray(reference(jnp.asarray(x_hat), w))), rounding)


@pytest.mark.parametrize("kind", INT_KINDS)
@pytest.mark.parametrize("offset", [True, False], ids=["offset", "no-offset"])
@pytest.mark.parametrize("group", [32, 64, 128, "K"])
@pytest.mark.parametrize("m", [1, 3, 8, 32])
def test_int8_activations_stay_within_the_bound(kind, offset, group, m):
    # K=600: a partial last block; 608 and 576: an odd number of blocks (half a 64-value pair).
    odd = {32: 608, 64: 576, 128: 384, "K": 608}[group]
    for n, k in ((7, 256), (100, 640 if group != "K" else 600), (5, odd)):
        g = k if group == "K" else group
        w = make_weight(hash((kind, offset, g, m, n, "int8")) % 2**32, kind, n, k, g, offset)
        x = make_x(m + 100, m, k)
        assert_within_int8_bound(native.native_qmatmul(x, w, int8_activations=True), reference(x, w), x, w)


@pytest.mark.parametrize("kind", INT_KINDS)
@pytest.mark.parametrize("m", [1, 8])
def test_int8_activations_read_the_given_layer_of_the_stack_under_jit(kind, m):
    w = make_weight(7, kind, 37, 1536, 32, offset=True, layers=3)
    poison = lambda a, v: a.at[0].set(v).at[2].set(v)  # layers 0 and 2: NaN scale and offset
    stacked = QuantizedWeight(
        poison(w.q, 0), poison(w.scale, jnp.nan), poison(w.offset, jnp.nan), kind, 32, (1536,), (37,)
    )
    x = make_x(8, m, 1536)
    out = jax.jit(lambda x, w, i: native.native_qmatmul(x, w, i, int8_activations=True))(x, stacked, jnp.int32(1))
    assert np.isfinite(np.asarray(out)).all()
    one = jax.tree.map(lambda a: a[1], w)
    assert_within_int8_bound(out, reference(x, one), x, one)
    np.testing.assert_array_equal(out, native.native_qmatmul(x, one, int8_activations=True))


def test_int8_activations_leave_fp8_and_group_16_to_the_float_math():
    for kind, group in (("fp8", 32), ("uint4", 16), ("int8", 16)):
        w = make_weight(9, kind, 20, 256, group)
        x = make_x(10, 3, 256)
        exact = native.native_qmatmul(x, w, int8_activations=False)
        np.testing.assert_array_equal(native.native_qmatmul(x, w, int8_activations=True), exact)


def test_int8_activations_follow_the_environment_when_not_given(monkeypatch):
    w, x = make_weight(11, "uint4", 16, 256, 32), make_x(12, 2, 256)
    exact, quantized = (native.native_qmatmul(x, w, int8_activations=v) for v in (False, True))
    assert not np.array_equal(exact, quantized)
    monkeypatch.setenv("JAXLLM_QMATMUL_INT8_ACT", "1")
    np.testing.assert_array_equal(native.native_qmatmul(x, w), quantized)
    monkeypatch.setenv("JAXLLM_QMATMUL_INT8_ACT", "0")
    np.testing.assert_array_equal(native.native_qmatmul(x, w), exact)


def test_int8_activations_carry_nan_and_infinity_in_x_to_the_row():
    w = make_weight(13, "int8", 9, 256, 32, offset=False)
    x = make_x(14, 3, 256).at[1, 40].set(jnp.nan).at[2, 200].set(jnp.inf)
    out = np.asarray(native.native_qmatmul(x, w, int8_activations=True))
    assert np.isfinite(out[0]).all() and np.isnan(out[1:]).all()


@pytest.mark.parametrize("flag", ["-mno-avx512vnni", "-mno-avx512f"])
def test_int8_activations_without_vnni_give_the_same_sums(flag):
    """Built without VNNI (or AVX-512), the integer path runs its portable loop: within float rounding of
    the VNNI path, and so within the same bound."""
    target = f"jaxllm_qmatmul_int_{flag[6:]}"
    lib = ctypes.cdll.LoadLibrary(str(native_build.build(native.SOURCE, target, [*native_build.FLAGS, flag])))
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.JaxllmQMatmulF32), platform="cpu")
    for i, (kind, offset, group, m, k) in enumerate(
        [
            ("int8", False, 32, 3, 640),
            ("uint4", True, 32, 8, 608),
            ("int8", True, 64, 1, 640),
            ("uint4", False, 600, 5, 600),
        ]
    ):
        w = make_weight(30 + i, kind, 9, k, group, offset)
        x = make_x(31 + i, m, k)
        out = native._call(target, x, w, None, int8_activations=True)
        assert_within_int8_bound(out, reference(x, w), x, w)
        vnni = native.native_qmatmul(x, w, int8_activations=True)
        bound = np.abs(np.asarray(x)) @ np.abs(np.asarray(w.dequantize())).T
        np.testing.assert_array_less(np.abs(np.asarray(out) - np.asarray(vnni)), TOL * bound)


# The bf16-dot path (bf16_dot): x and the dequantized weights rounded to bfloat16, float32 sums.


def assert_within_bf16_bound(out, expected, x, w):
    """Each product carries the rounding of x and w to bfloat16 (relative 2^-9 each): 2^-7 of sum |x| |w|
    bounds it with room for float32 summation; a wrong pairing of x and w would be off by sum |x| |w|."""
    out, expected = np.asarray(out), np.asarray(expected)
    bound = np.abs(np.asarray(x)) @ np.abs(np.asarray(w.dequantize())).T
    np.testing.assert_array_less(np.abs(out - expected), 2.0**-7 * bound + 1e-30)
    assert np.abs(out - expected).max() > 0  # the bf16 path ran: its products are not float32's


@pytest.mark.skipif(not native_build.cpu_has("avx512_bf16"), reason="needs AVX-512 BF16")
@pytest.mark.parametrize(
    "kind, group", [(k, g) for k in KINDS for g in (32, 64, 128, "K")] + [(k, "K") for k in HALF_KINDS]
)
@pytest.mark.parametrize("m", [1, 7, 16, 33])
def test_bf16_dot_stays_within_the_bound(kind, group, m):
    offset = kind not in HALF_KINDS
    for n, k in ((9, 256), (37, 640)):
        g = k if group == "K" else group
        w = make_weight(hash((kind, g, m, n, "bf16")) % 2**32, kind, n, k, g, offset)
        x = make_x(m + 1, m, k)
        assert_within_bf16_bound(native.native_qmatmul(x, w, bf16_dot=True), reference(x, w), x, w)
    stacked = make_weight(8, kind, 21, 256, 256 if group == "K" else group, offset, layers=3)
    x = make_x(9, m, 256)
    one = jax.tree.map(lambda a: a[2], stacked)
    out = jax.jit(lambda x, w, i: native.native_qmatmul(x, w, i, bf16_dot=True))(x, stacked, jnp.int32(2))
    np.testing.assert_array_equal(out, native.native_qmatmul(x, one, bf16_dot=True))


def test_bf16_dot_leaves_what_it_cannot_pair_to_the_float_math():
    for kind, k, group in (("int8", 600, 600), ("int8", 256, 16)):  # K not in 32-blocks; groups of 16
        w = make_weight(12, kind, 9, k, group, offset=True)
        x = make_x(13, 16, k)
        np.testing.assert_array_equal(native.native_qmatmul(x, w, bf16_dot=True), native.native_qmatmul(x, w))


def test_bf16_dot_is_chosen_only_when_asked_and_from_16_rows_then_for_every_row_count(monkeypatch):
    from jaxllm.kernels.qmatmul import qmatmul

    w = make_weight(14, "uint4", 64, 256, 32)
    monkeypatch.delenv("JAXLLM_QMATMUL_BF16", raising=False)
    for m in (1, 16, 32):
        x = make_x(15, m, 256)
        np.testing.assert_array_equal(qmatmul(x, w, impl="native"), native.native_qmatmul(x, w))
    monkeypatch.setenv("JAXLLM_QMATMUL_BF16", "1")
    np.testing.assert_array_equal(
        qmatmul(make_x(15, 8, 256), w, impl="native"), native.native_qmatmul(make_x(15, 8, 256), w)
    )
    x = make_x(15, 32, 256)
    np.testing.assert_array_equal(qmatmul(x, w, impl="native"), native.native_qmatmul(x, w, bf16_dot=True))
    # Prefill-sized calls: XLA's float32 dot by default, the native bf16 kernel when asked for.
    from jaxllm.kernels.qmatmul import NATIVE_MAX_ROWS, reference_qmatmul

    x = make_x(16, NATIVE_MAX_ROWS + 8, 256)
    np.testing.assert_array_equal(qmatmul(x, w), native.native_qmatmul(x, w, bf16_dot=True))
    monkeypatch.delenv("JAXLLM_QMATMUL_BF16")
    np.testing.assert_array_equal(qmatmul(x, w), reference_qmatmul(x, w))
