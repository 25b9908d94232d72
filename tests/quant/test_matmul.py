"""The matmul seam: a QuantizedWeight in any of the models' einsums gives the float einsum of its values."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import quant
from jaxllm.quant.isq import parse_scheme, quantize
from jaxllm.quant.rows import to_weight

# (spec, x shape, in dims, out dims, float layout: "in_out" or "out_in")
SPECS = [
    ("btd,dkgh->btkgh", (2, 3, 64), (64,), (2, 3, 8), "in_out"),
    ("bthk,hkd->btd", (2, 3, 4, 16), (4, 16), (32,), "in_out"),
    ("btd,dcf->btcf", (1, 5, 64), (64,), (2, 48), "in_out"),
    ("btf,fd->btd", (1, 5, 96), (96,), (32,), "in_out"),
    ("...d,vd->...v", (3, 64), (64,), (50,), "out_in"),
    ("...d,dv->...v", (2, 2, 64), (64,), (50,), "in_out"),
]


def _weight(in_dims, out_dims, scheme: str, seed=0):
    rng = np.random.default_rng(seed)
    rows = rng.normal(0, 0.1, (math.prod(out_dims), math.prod(in_dims))).astype(np.float32)
    w = jax.tree.map(jnp.asarray, to_weight(quantize(rows, parse_scheme(scheme)), in_dims, out_dims))
    return w, np.asarray(w.dequantize()).reshape(*out_dims, *in_dims)


@pytest.mark.parametrize("spec, x_shape, in_dims, out_dims, layout", SPECS)
@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_quantized_einsum_equals_the_float_einsum_of_its_values(spec, x_shape, in_dims, out_dims, layout, scheme):
    w, dense = _weight(in_dims, out_dims, scheme)
    if layout == "in_out":
        n_out = len(out_dims)
        dense = np.transpose(dense, [*range(n_out, dense.ndim), *range(n_out)])
    x = jnp.asarray(np.random.default_rng(1).normal(0, 1, x_shape).astype(np.float32))
    got = jax.jit(lambda x, w: quant.einsum(spec, x, w))(x, w)
    np.testing.assert_allclose(got, jnp.einsum(spec, x, dense), rtol=1e-5, atol=1e-5)


def test_float_weights_pass_straight_through():
    x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    assert quant.einsum("bd,dv->bv", x, w, preferred_element_type=jnp.float32).shape == (2, 4)


def test_take_gathers_dequantized_rows():
    w, dense = _weight((64,), (10,), "int4")
    ids = jnp.array([[0, 9], [3, 3]])
    np.testing.assert_array_equal(quant.take(w, ids), dense[np.asarray(ids)])


def test_a_mismatched_contraction_is_refused():
    w, _ = _weight((64,), (8,), "int8")
    with pytest.raises(ValueError, match="contracts"):
        quant.einsum("btd,dv->btv", jnp.ones((1, 1, 32)), w)


@pytest.mark.parametrize("spec, x_shape, in_dims, out_dims, layout", [s for s in SPECS if s[4] == "in_out"][:4])
@pytest.mark.parametrize("scheme", [None, "int8"])
@pytest.mark.parametrize("rows", ["several-adapters", "one-adapter", "no-adapter"])
def test_lora_adds_each_rows_own_adapter(spec, x_shape, in_dims, out_dims, layout, scheme, rows):
    """Stacked weights and adapters read at a layer: every row gets x @ a[slot] @ b[slot] of its own slot on
    top of the base einsum (float or quantized); a row whose slot is -1 gets the base alone. Batches of
    several adapters, of one (beside base rows) and of none take different paths on device."""
    w, dense = _weight(in_dims, out_dims, scheme or "int8")
    n_out = len(out_dims)
    dense = np.transpose(dense, [*range(n_out, dense.ndim), *range(n_out)])  # [in..., out...]
    base = jnp.asarray(dense) if scheme is None else w
    stack = lambda t: jax.tree.map(lambda a: jnp.stack([a * 0, a]), t)  # two layers, the second the real one
    k, n, slots, rank = math.prod(in_dims), math.prod(out_dims), 3, 4
    rng = np.random.default_rng(2)
    a = rng.normal(0, 0.3, (2, slots, k, rank)).astype(np.float32)
    b = rng.normal(0, 0.3, (2, slots, rank, n)).astype(np.float32)
    x = rng.normal(0, 1, x_shape).astype(np.float32)
    lead = x_shape[:2]
    ids = np.arange(math.prod(lead)).reshape(lead) % (slots + 1) - 1  # every slot and -1
    if rows == "one-adapter":
        ids = np.where(ids % 2 == 0, 2, -1)
    elif rows == "no-adapter":
        ids = np.full(lead, -1)
    lora = quant.Lora(jnp.asarray(a), jnp.asarray(b), jnp.asarray(ids, jnp.int32))
    got = jax.jit(lambda x, w, lora: quant.einsum(spec, x, w, layer=jnp.int32(1), lora=lora))(x, stack(base), lora)
    want = np.array(jnp.einsum(spec, x, dense))
    x_rows = x.reshape(*lead, k)  # every spec here contracts all of x's letters after batch and time
    for i in np.ndindex(*lead):
        if ids[i] < 0:
            continue
        delta = (x_rows[i] @ a[1, ids[i]] @ b[1, ids[i]]).reshape(out_dims)
        want[i] += delta.reshape(want[i].shape)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
