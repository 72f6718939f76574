"""keras_custom.privacy.ghost against NumPy references built from the definition
(hypothesis), on every backend.

The references never use ghost.py's letter classification: an EinsumDense output
is linear in the kernel, so each example's kernel gradient is M_i^T g_i with the
columns of M_i obtained by running the layer's own einsum on basis kernels.
"""

import itertools
import string

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

from keras_custom.privacy import clip_factors
from keras_custom.privacy import ghost

# Few examples: on JAX every new shape compiles each op (seconds per example).
SETTINGS = settings(max_examples=12, deadline=None)


def np_(x):
    return np.asarray(ops.convert_to_numpy(x))


def expand(equation, rank):
    lhs, rest = equation.split(",")
    kernel, out = rest.split("->")
    if "..." in lhs:
        n = rank - (len(lhs) - 3)
        fresh = "".join(c for c in string.ascii_letters if c not in equation)[:n]
        lhs, out = lhs.replace("...", fresh), out.replace("...", fresh)
    return lhs, kernel, out


def ref_einsum(equation, a, g, kernel_shape, bias_axes, bias_shape):
    """Per-example (kernel, bias) gradients by the definition (a linear map's transpose)."""
    lhs, kernel, out = expand(equation, a.ndim)
    B = a.shape[0]
    n_k = int(np.prod(kernel_shape))
    grads_k = np.zeros((B, n_k))
    for k in range(n_k):
        basis = np.zeros(n_k)
        basis[k] = 1.0
        z = np.einsum(f"{lhs},{kernel}->{out}", a, basis.reshape(kernel_shape))
        grads_k[:, k] = (z * g).reshape(B, -1).sum(1)
    grads_b = None
    if bias_axes:
        n_b = int(np.prod(bias_shape))
        grads_b = np.zeros((B, n_b))
        for k in range(n_b):
            basis = np.zeros(n_b)
            basis[k] = 1.0
            z = np.broadcast_to(basis.reshape(bias_shape), g.shape[1:])[None]
            grads_b[:, k] = (z * g).reshape(B, -1).sum(1)
    return grads_k, grads_b


def bias_shape_of(out, bias_axes, sizes):
    first = min(out.find(ch) for ch in bias_axes)
    return tuple(sizes[ch] if ch in bias_axes else 1 for ch in out[first:])


# (equation, bias_axes or None, number of elided dims when there is an ellipsis)
EQUATIONS = [
    ("ab,bc->ac", "c"),
    ("abc,cd->abd", "d"),
    ("abc,cd->abd", None),
    ("abc,cde->abde", "de"),  # Keras MultiHeadAttention q/k/v projection
    ("abc,cde->abde", "e"),
    ("abcd,cde->abe", "e"),  # MultiHeadAttention output projection
    ("btd,ndh->btnh", "nh"),  # KerasHub (Gemma-style) projection
    ("btnh,nhd->btd", "d"),
    ("...b,bc->...c", "c"),
    ("abc,bcd->abd", "bd"),  # block-diagonal ("shared" axis b)
    ("abc,cd->ad", "d"),  # axis b summed by the forward
    ("abcd,de->abce", "e"),
]


@SETTINGS
@given(
    case=st.sampled_from(EQUATIONS),
    dims=st.lists(st.integers(1, 4), min_size=8, max_size=8),
    batch=st.integers(1, 4),
    rank_extra=st.integers(0, 2),
    method=st.sampled_from(["auto", "gram", "direct"]),
    seed=st.integers(0, 2**16),
)
def test_einsum_sq_norms_and_clipped(case, dims, batch, rank_extra, method, seed):
    equation, bias_axes = case
    rng = np.random.default_rng(seed)
    lhs_raw = equation.split(",")[0]
    rank = len(lhs_raw) - 3 + 1 + rank_extra if "..." in lhs_raw else len(lhs_raw)
    lhs, kernel, out = expand(equation, rank)
    letters = sorted(set(lhs + kernel + out))
    sizes = dict(zip(letters, itertools.cycle(dims)))
    sizes[lhs[0]] = batch
    a = rng.normal(size=[sizes[ch] for ch in lhs]).astype("float32")
    g = rng.normal(size=[sizes[ch] for ch in out]).astype("float32")
    kernel_shape = tuple(sizes[ch] for ch in kernel)
    bshape = bias_shape_of(out, bias_axes, sizes) if bias_axes else None
    gk, gb = ref_einsum(
        equation,
        a.astype("float64"),
        g.astype("float64"),
        kernel_shape,
        bias_axes,
        bshape,
    )
    expected = (gk**2).sum(1) + ((gb**2).sum(1) if gb is not None else 0.0)
    got = np_(ghost.einsum_sq_norms(equation, a, g, bias_axes, method=method))
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-5)

    c = rng.uniform(0.0, 1.0, size=batch).astype("float32")
    k, b = ghost.einsum_clipped_grads(equation, a, g, c, bias_axes, bshape)
    np.testing.assert_allclose(np_(k).reshape(-1), c @ gk, rtol=2e-5, atol=1e-5)
    if bias_axes:
        assert tuple(b.shape) == bshape
        np.testing.assert_allclose(np_(b).reshape(-1), c @ gb, rtol=2e-5, atol=1e-5)


@SETTINGS
@given(
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    batch=st.integers(1, 5),
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    use_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_dense(shape, batch, d_in, d_out, use_bias, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(batch, *shape, d_in)).astype("float32")
    g = rng.normal(size=(batch, *shape, d_out)).astype("float32")
    a2 = a.reshape(batch, -1, d_in).astype("float64")
    g2 = g.reshape(batch, -1, d_out).astype("float64")
    kern = np.stack([a2[i].T @ g2[i] for i in range(batch)])  # (B, d_in, d_out)
    bias = g2.sum(1)
    expected = (kern**2).sum((1, 2)) + ((bias**2).sum(1) if use_bias else 0)
    for method in ("auto", "gram", "direct"):
        got = np_(ghost.dense_sq_norms(a, g, use_bias, method=method))
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-5)
    c = rng.uniform(size=batch).astype("float32")
    k, b = ghost.dense_clipped_grads(a, g, c, use_bias)
    np.testing.assert_allclose(
        np_(k), np.einsum("b,bio->io", c, kern), rtol=2e-5, atol=1e-5
    )
    if use_bias:
        np.testing.assert_allclose(np_(b), c @ bias, rtol=2e-5, atol=1e-5)
    else:
        assert b is None


@SETTINGS
@given(
    shape=st.lists(st.integers(1, 6), min_size=0, max_size=2),
    batch=st.integers(1, 5),
    vocab=st.integers(1, 5),  # small vocabularies: many repeated tokens
    dim=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_embedding(shape, batch, vocab, dim, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, *shape)).astype("int32")
    g = rng.normal(size=(batch, *shape, dim)).astype("float32")
    per = np.zeros((batch, vocab, dim))
    for i in range(batch):
        for t, tok in enumerate(ids[i].reshape(-1)):
            per[i, tok] += g[i].reshape(-1, dim)[t]
    got = np_(ghost.embedding_sq_norms(ids, g))
    np.testing.assert_allclose(got, (per**2).sum((1, 2)), rtol=2e-5, atol=1e-5)
    c = rng.uniform(size=batch).astype("float32")
    got_sum = np_(ghost.embedding_clipped_grad(ids, g, c, vocab))
    np.testing.assert_allclose(
        got_sum, np.einsum("b,bvd->vd", c, per), rtol=2e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "equation", ["ab,bc->a", "abc,cd->abde", "ab,bc->bc", "aa,ab->ab"]
)
def test_unsupported_equations_raise(equation):
    with pytest.raises(ghost.UnsupportedEquation):
        rank = 2 if equation.startswith(("ab,", "aa")) else 3
        ghost.parse_einsum(equation, rank)


def test_cost_rule_picks_gram_for_short_sequences():
    spec = ghost.parse_einsum("abc,cd->abd", 3)
    a = np.zeros((2, 4, 64), "float32")
    g = np.zeros((2, 4, 64), "float32")
    assert ghost._use_gram(spec, a, g)  # T=4: 4*128 < 64*64
    a = np.zeros((2, 512, 8), "float32")
    g = np.zeros((2, 512, 8), "float32")
    assert not ghost._use_gram(spec, a, g)  # T=512: 512*16 > 64


@settings(max_examples=40, deadline=None)
@given(
    norms=st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=8),
    clip=st.floats(1e-3, 1e3),
)
def test_clip_factors_bound_every_norm(norms, clip):
    factors = np_(clip_factors(np.asarray(norms, "float32"), clip))
    clipped = factors * np.asarray(norms, "float32")
    assert np.all(np.isfinite(factors)) and np.all(factors <= 1.0)
    assert np.all(clipped <= clip * (1 + 1e-6))
    under = np.asarray(norms) <= clip
    np.testing.assert_array_equal(factors[under], 1.0)  # untouched under the clip
