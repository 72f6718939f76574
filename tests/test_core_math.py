"""Property tests of the pure `keras.ops` functions behind the core hooks."""

import keras
import numpy as np
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_custom.hooks import clip_by_global_norm
from keras_custom.hooks import clip_by_norm
from keras_custom.hooks import clip_by_value
from keras_custom.hooks import global_norm
from keras_custom.hooks import weight_penalty

FAST = settings(max_examples=60, deadline=None)

# Subnormals are excluded: TensorFlow flushes them to zero on CPU.
floats = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32)
tensor = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4),
    elements=floats,
)
tensors = st.lists(tensor, min_size=1, max_size=4)
positive = st.floats(1e-3, 1e3, allow_nan=False)


def np_norm(arrays):
    return float(np.sqrt(sum(np.sum(np.square(a.astype(np.float64))) for a in arrays)))


def flush(a):
    """Subnormals to zero, as TensorFlow's CPU kernels do."""
    return np.where(np.abs(a) < np.finfo(np.float32).tiny, np.float32(0), a)


def to_np(grads):
    return [keras.ops.convert_to_numpy(g) for g in grads]


@FAST
@given(tensors)
def test_global_norm_matches_numpy(arrays):
    got = float(global_norm([keras.ops.convert_to_tensor(a) for a in arrays]))
    np.testing.assert_allclose(got, np_norm(arrays), rtol=1e-5, atol=1e-6)


@FAST
@given(tensors, positive)
def test_clip_by_global_norm_bounds_the_norm(arrays, max_norm):
    out = to_np(clip_by_global_norm(arrays, max_norm))
    assert np_norm(out) <= max_norm * (1 + 1e-5) + 1e-6


@FAST
@given(tensors, positive)
def test_clip_by_global_norm_leaves_small_gradients_untouched(arrays, max_norm):
    norm = np_norm(arrays)
    if norm > max_norm:
        arrays = [flush(a * np.float32(max_norm / norm * 0.5)) for a in arrays]
    out = to_np(clip_by_global_norm(arrays, max_norm))
    for a, b in zip(arrays, out):
        np.testing.assert_array_equal(a, b)  # bit-identical


@FAST
@given(tensors, positive)
def test_clip_by_global_norm_keeps_direction(arrays, max_norm):
    out = to_np(clip_by_global_norm(arrays, max_norm))
    norm = np_norm(arrays)
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    for a, b in zip(arrays, out):
        np.testing.assert_allclose(b, a * factor, rtol=1e-5, atol=1e-5)


@FAST
@given(tensors, positive)
def test_clipping_twice_is_stable(arrays, max_norm):
    once = to_np(clip_by_global_norm(arrays, max_norm))
    twice = to_np(clip_by_global_norm(once, max_norm))
    for a, b in zip(once, twice):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@FAST
@given(tensors, positive)
def test_clip_by_value_bounds_every_element(arrays, limit):
    out = to_np(clip_by_value(arrays, limit))
    for a, b in zip(arrays, out):
        assert np.all(np.abs(b) <= np.float32(limit))
        np.testing.assert_array_equal(
            b, np.clip(a, -np.float32(limit), np.float32(limit))
        )


@FAST
@given(tensors, positive)
def test_clip_by_norm_is_per_tensor(arrays, max_norm):
    out = to_np(clip_by_norm(arrays, max_norm))
    for a, b in zip(arrays, out):
        na = np_norm([a])
        assert np_norm([b]) <= max_norm * (1 + 1e-5) + 1e-6
        if na <= max_norm:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(b, a * (max_norm / na), rtol=1e-5, atol=1e-5)


@FAST
@given(tensors, st.floats(0, 10), st.floats(0, 10))
def test_weight_penalty_matches_numpy(arrays, l1, l2):
    got = float(weight_penalty(arrays, l1, l2))
    a64 = [a.astype(np.float64) for a in arrays]
    want = l1 * sum(np.abs(a).sum() for a in a64) + l2 * sum((a * a).sum() for a in a64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_none_gradients_pass_through():
    g = keras.ops.ones((2,))
    assert clip_by_global_norm([None, g], 1.0)[0] is None
    assert clip_by_norm([None], 1.0) == [None]
    assert clip_by_value([None], 1.0) == [None]
    assert float(global_norm([None, g])) == np.float32(np.sqrt(2))


def test_zero_gradient_stays_zero():
    out = to_np(clip_by_global_norm([np.zeros(3, np.float32)], 1.0))
    np.testing.assert_array_equal(out[0], np.zeros(3))
    out = to_np(clip_by_norm([np.zeros(3, np.float32)], 1.0))
    np.testing.assert_array_equal(out[0], np.zeros(3))
