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
