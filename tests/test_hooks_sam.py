"""SharpnessAware (SAM): the gradient at w + rho * g / ||g||, weights restored."""

import re

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import keras_custom as kc
from keras_custom import hooks

npv = keras.ops.convert_to_numpy


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        hnp.arrays(np.float32, st.integers(1, 5), elements=st.floats(-5, 5, width=32)),
        min_size=1,
        max_size=3,
    ),
    st.floats(1e-3, 1.0),
)
def test_perturbation_matches_numpy(grads, rho):
    out = [npv(e) for e in hooks.sam_perturbation(grads, rho)]
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads))
    for e, g in zip(out, grads):
        np.testing.assert_allclose(e, rho * g / (norm + 1e-12), rtol=1e-5, atol=1e-6)
    total = np.sqrt(sum(np.sum(e.astype(np.float64) ** 2) for e in out))
    if norm > 1e-3:
        assert total == pytest.approx(rho, rel=1e-4)


def linear_model(w0):
    """y = x @ w (no bias): the MSE loss is quadratic in w."""
    model = kc.Sequential(
        [keras.Input((3,)), keras.layers.Dense(1, use_bias=False, name="lin")]
    )
    model.get_layer("lin").kernel.assign(w0)
    return model


def grad_np(w, x, y):
    """d/dw mean((x w - y)^2) = 2/n x^T (x w - y)."""
    return 2.0 / len(x) * x.T @ (x @ w - y)


def sam_grad_np(w, x, y, rho):
    g = grad_np(w, x, y)
    return grad_np(w + rho * g / np.linalg.norm(g), x, y)


def problem():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 3))
    y = rng.normal(size=(16, 1))
    w0 = rng.normal(size=(3, 1))
    return x, y, w0


@pytest.mark.parametrize("jit_compile", [False, True])
def test_sgd_step_uses_the_sam_gradient_closed_form(jit_compile):
    x, y, w0 = problem()
    rho, lr = 0.5, 0.1
    model = linear_model(w0.astype("float32"))
    model.compile(
        keras.optimizers.SGD(lr),
        "mse",
        hooks=[hooks.SharpnessAware(rho)],
        jit_compile=jit_compile,
    )
    model.fit(x.astype("float32"), y.astype("float32"), batch_size=16, verbose=0)
    expected = w0 - lr * sam_grad_np(w0, x, y, rho)
    plain = w0 - lr * grad_np(w0, x, y)
    got = npv(model.get_layer("lin").kernel)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(expected - plain).max() > 1e-2  # plain SGD would fail the test


def test_several_steps_and_weights_restored_exactly():
    x, y, w0 = problem()
    rho, lr = 0.2, 0.05
    model = linear_model(w0.astype("float32"))
    model.compile(keras.optimizers.SGD(lr), "mse", hooks=[hooks.SharpnessAware(rho)])
    w = w0.copy()
    for _ in range(3):
        model.train_on_batch(x.astype("float32"), y.astype("float32"))
        w = w - lr * sam_grad_np(w, x, y, rho)
    np.testing.assert_allclose(npv(model.get_layer("lin").kernel), w, rtol=1e-4)
    # with lr = 0 the weights come back bit-identical after the perturbation
    model.compile(keras.optimizers.SGD(0.0), "mse", hooks=[hooks.SharpnessAware(rho)])
    before = npv(model.get_layer("lin").kernel).copy()
    model.train_on_batch(x.astype("float32"), y.astype("float32"))
    np.testing.assert_array_equal(npv(model.get_layer("lin").kernel), before)


def test_composes_with_clipping_after_it():
    x, y, w0 = problem()
    rho, lr, c = 0.5, 1.0, 1e-3
    model = linear_model(w0.astype("float32"))
    model.compile(
        keras.optimizers.SGD(lr),
        "mse",
        hooks=[
            hooks.SharpnessAware(rho),
            hooks.LogGradNorm(name="sam_norm"),
            hooks.ClipByGlobalNorm(c),
        ],
    )
    logs = model.train_on_batch(
        x.astype("float32"), y.astype("float32"), return_dict=True
    )
    g = sam_grad_np(w0, x, y, rho)
    assert logs["sam_norm"] == pytest.approx(np.linalg.norm(g), rel=1e-5)
    expected = w0 - lr * c * g / np.linalg.norm(g)
    np.testing.assert_allclose(
        npv(model.get_layer("lin").kernel), expected, rtol=1e-5, atol=1e-7
    )


def test_window_and_nothing_logged_twice():
    x, y, w0 = problem()
    model = linear_model(w0.astype("float32"))
    model.compile(
        keras.optimizers.SGD(0.1),
        "mse",
        hooks=[hooks.WeightPenalty(l2=0.01), hooks.SharpnessAware(0.5, start_step=1)],
    )
    logs = model.train_on_batch(
        x.astype("float32"), y.astype("float32"), return_dict=True
    )
    # step 0 is outside the window: a plain step with the L2 term
    g = grad_np(w0, x, y) + 2 * 0.01 * w0
    np.testing.assert_allclose(
        npv(model.get_layer("lin").kernel), w0 - 0.1 * g, rtol=1e-5, atol=1e-7
    )
    assert logs["weight_penalty"] == pytest.approx(0.01 * np.sum(w0**2), rel=1e-5)


def test_save_load_round_trip(tmp_path):
    x, y, w0 = problem()
    sched = keras.optimizers.schedules.ExponentialDecay(0.5, 10, 0.5)
    model = linear_model(w0.astype("float32"))
    model.compile("adam", "mse", hooks=[hooks.SharpnessAware(sched, stop_step=100)])
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    model.save(tmp_path / "sam.keras")
    restored = keras.models.load_model(tmp_path / "sam.keras")
    (hook,) = restored.hooks
    assert isinstance(hook, hooks.SharpnessAware)
    assert isinstance(hook.rho, keras.optimizers.schedules.ExponentialDecay)
    assert hook.get_config() == model.hooks[0].get_config()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    restored.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "rho, error, text",
    [
        (
            0.0,
            ValueError,
            "SharpnessAware: `rho` must be a finite float > 0. Received: rho=0.0",
        ),
        (-0.05, ValueError, "rho=-0.05"),
        (float("inf"), ValueError, "rho=inf"),
        ("0.05", TypeError, "SharpnessAware: `rho` must be a float"),
        (None, TypeError, "rho=None"),
    ],
)
def test_bad_rho(rho, error, text):
    with pytest.raises(error, match=re.escape(text)):
        hooks.SharpnessAware(rho)
