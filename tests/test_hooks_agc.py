"""AdaptiveClip (unit-wise AGC) and ClipByGlobalNorm's norm logging."""

import keras
import numpy as np
import pytest
from conftest import mlp
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import keras_custom as kc
from keras_custom import hooks

npv = keras.ops.convert_to_numpy
FAST = settings(max_examples=60, deadline=None)


def np_agc(g, w, clip_factor, eps):
    """NumPy reference: the NFNets formula, written independently."""
    g = g.astype(np.float64)
    w = w.astype(np.float64)
    if w.ndim <= 1:
        wn = np.sqrt(np.sum(w**2))
        gn = np.sqrt(np.sum(g**2))
    else:
        axes = tuple(range(w.ndim - 1))
        wn = np.sqrt(np.sum(w**2, axis=axes, keepdims=True))
        gn = np.sqrt(np.sum(g**2, axis=axes, keepdims=True))
    max_norm = clip_factor * np.maximum(wn, eps)
    return np.where(gn > max_norm, g * max_norm / np.maximum(gn, 1e-30), g)


shapes = st.sampled_from([(), (5,), (3, 4), (2, 2, 3, 4), (1, 6)])


@st.composite
def grad_and_weight(draw):
    shape = draw(shapes)
    elems = st.floats(-10, 10, width=32, allow_subnormal=False)
    g = draw(hnp.arrays(np.float32, shape, elements=elems))
    w = draw(hnp.arrays(np.float32, shape, elements=elems))
    return g, w


@FAST
@given(grad_and_weight(), st.floats(1e-3, 1.0), st.floats(1e-4, 1e-1))
def test_adaptive_clip_matches_numpy(gw, clip_factor, eps):
    g, w = gw
    out = hooks.adaptive_clip([g], [w], clip_factor, eps)[0]
    np.testing.assert_allclose(
        np.asarray(out), np_agc(g, w, clip_factor, eps), rtol=2e-5, atol=1e-6
    )


@FAST
@given(grad_and_weight(), st.floats(1e-3, 1.0))
def test_adaptive_clip_bounds_every_unit_and_leaves_small_units(gw, clip_factor):
    g, w = gw
    eps = 1e-3
    out = np.asarray(hooks.adaptive_clip([g], [w], clip_factor, eps)[0])
    gn = np.asarray(hooks.unitwise_norm(g))
    wn = np.asarray(hooks.unitwise_norm(w))
    on = np.asarray(hooks.unitwise_norm(out))
    bound = clip_factor * np.maximum(wn, eps)
    assert np.all(on <= bound * (1 + 1e-5) + 1e-7)
    # units already within the bound are bit-identical
    keep = np.broadcast_to(gn <= bound, g.shape)
    np.testing.assert_array_equal(out[keep], g[keep])


def test_units_are_last_axis_and_bias_is_one_unit():
    g = np.array([[3.0, 0.0], [4.0, 0.1]], "float32")  # unit 0 norm 5, unit 1 0.1
    w = np.array([[10.0, 10.0], [0.0, 0.0]], "float32")  # unit norms 10, 10
    out = np.asarray(hooks.adaptive_clip([g], [w], clip_factor=0.1)[0])
    np.testing.assert_allclose(out[:, 0], [0.6, 0.8], rtol=1e-6)  # clipped to 1
    np.testing.assert_array_equal(out[:, 1], g[:, 1])  # 0.1 <= 1: untouched
    b = np.array([3.0, 4.0], "float32")  # a bias: one unit of norm 5
    out_b = np.asarray(hooks.adaptive_clip([b], [np.zeros(2, "float32")], 0.5, 2.0)[0])
    np.testing.assert_allclose(out_b, [0.6, 0.8], rtol=1e-6)  # bound 0.5 * eps = 1
    assert hooks.adaptive_clip([None], [b], 0.1) == [None]


def test_conv_kernel_units_are_output_channels():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(3, 3, 2, 4)).astype("float32")
    w = rng.normal(size=(3, 3, 2, 4)).astype("float32") * 0.1
    out = np.asarray(hooks.adaptive_clip([g], [w], 0.05)[0])
    for c in range(4):
        bound = 0.05 * max(np.linalg.norm(w[..., c]), 1e-3)
        assert np.linalg.norm(out[..., c]) == pytest.approx(
            min(np.linalg.norm(g[..., c]), bound), rel=1e-5
        )


def test_fit_uses_agc_with_sgd(data):
    """One SGD step with lr=1: the update is exactly the clipped gradient."""
    x, y = data
    ref = mlp(keras.Model)
    model = mlp()
    model.compile(keras.optimizers.SGD(1.0), "mse", hooks=[hooks.AdaptiveClip(0.02)])
    ref.compile(keras.optimizers.SGD(1.0), "mse")
    w0 = [npv(v) for v in model.trainable_variables]
    grads = _numpy_grads(ref, x, y)
    model.train_on_batch(x, y)
    for v, w, g in zip(model.trainable_variables, w0, grads):
        expected = w - np_agc(g, w, 0.02, 1e-3)
        np.testing.assert_allclose(npv(v), expected, rtol=1e-4, atol=1e-6)


def _numpy_grads(model, x, y):
    """Gradients by a plain Keras SGD(lr=1) step on a copy: g = w_before - w_after."""
    before = [npv(v) for v in model.trainable_variables]
    model.train_on_batch(x, y)
    after = [npv(v) for v in model.trainable_variables]
    return [b - a for b, a in zip(before, after)]


def test_exclude_leaves_head_unclipped(data):
    x, y = data
    model = mlp()
    hook = hooks.AdaptiveClip(1e-6, exclude="out")
    model.compile(keras.optimizers.SGD(1.0), "mse", hooks=[hook])
    ref = mlp(keras.Model)
    ref.compile(keras.optimizers.SGD(1.0), "mse")
    head = [npv(v) for v in ref.get_layer("out").weights]
    ref.train_on_batch(x, y)
    model.train_on_batch(x, y)
    for a, b in zip(model.get_layer("out").weights, ref.get_layer("out").weights):
        np.testing.assert_allclose(npv(a), npv(b), rtol=1e-6)
    assert not np.allclose(npv(ref.get_layer("out").weights[0]), head[0])


def test_save_load_round_trip(data, tmp_path):
    x, y = data
    model = mlp()
    model.compile(
        "adam", "mse", hooks=[hooks.AdaptiveClip(0.05, eps=1e-2, exclude="out")]
    )
    model.fit(x, y, epochs=1, verbose=0)
    path = tmp_path / "agc.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    (hook,) = restored.hooks
    assert isinstance(hook, hooks.AdaptiveClip)
    assert hook.get_config() == model.hooks[0].get_config()
    assert hook.clip_factor == 0.05 and hook.eps == 1e-2 and hook.exclude == ("out",)
    model.fit(x, y, epochs=1, verbose=0, shuffle=False)
    restored.fit(x, y, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_config_round_trip():
    hook = hooks.AdaptiveClip(0.1, eps=1e-4, include=["hidden"], start_step=2)
    again = hooks.AdaptiveClip.from_config(hook.get_config())
    assert again.get_config() == hook.get_config()


@pytest.mark.parametrize(
    "kwargs, error, text",
    [
        ({"clip_factor": 0.0}, ValueError, "AdaptiveClip: `clip_factor`"),
        ({"clip_factor": -1.0}, ValueError, "clip_factor=-1.0"),
        ({"clip_factor": "big"}, TypeError, "clip_factor='big'"),
        ({"eps": 0.0}, ValueError, "AdaptiveClip: `eps`"),
        ({"eps": float("nan")}, ValueError, "eps=nan"),
        (
            {"eps": keras.optimizers.schedules.ExponentialDecay(1.0, 1, 0.5)},
            TypeError,
            "eps",
        ),
        ({"include": 3}, TypeError, "AdaptiveClip: `include`"),
        ({"exclude": "("}, ValueError, "AdaptiveClip: `exclude`"),
    ],
)
def test_bad_arguments(kwargs, error, text):
    with pytest.raises(error, match=__import__("re").escape(text)):
        hooks.AdaptiveClip(**kwargs)


def test_pattern_matching_nothing_is_an_error():
    model = mlp()
    with pytest.raises(ValueError, match="AdaptiveClip: the `exclude` pattern 'nope'"):
        model.compile("sgd", "mse", hooks=[hooks.AdaptiveClip(exclude="nope")])


# ------------------------------------------------- ClipByGlobalNorm(log_norms=True)
def test_clip_by_global_norm_logs_norms(data):
    x, y = data
    model = mlp()
    model.compile(
        "sgd",
        "mse",
        hooks=[
            hooks.LogGradNorm(name="raw"),
            hooks.ClipByGlobalNorm(0.1, log_norms=True),
            hooks.LogGradNorm(name="clipped"),
        ],
    )
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0).history
    before = history["clip_by_global_norm/norm_before"]
    after = history["clip_by_global_norm/norm_after"]
    np.testing.assert_allclose(before, history["raw"], rtol=1e-5)
    np.testing.assert_allclose(after, history["clipped"], rtol=1e-5)
    assert max(after) <= 0.1 + 1e-6 and min(before) > 0.1


def test_clip_by_global_norm_without_logging_is_unchanged(data):
    hook = hooks.ClipByGlobalNorm(1.0)
    assert hook.get_config()["log_norms"] is False
    model = mlp()
    model.compile("sgd", "mse", hooks=[hook])
    history = model.fit(*data, epochs=1, verbose=0).history
    assert set(history) == {"loss"}
    with pytest.raises(TypeError, match="ClipByGlobalNorm: `log_norms`.*log_norms=1"):
        hooks.ClipByGlobalNorm(1.0, log_norms=1)


def test_exports():
    for name in ["AdaptiveClip", "adaptive_clip", "unitwise_norm"]:
        assert hasattr(kc.hooks, name)
