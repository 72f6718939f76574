"""SkipNonFinite: a NaN/Inf batch changes nothing; too many in a row stop training."""

import re

import keras
import numpy as np
import pytest
from conftest import mlp
from conftest import only_backends
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_custom import hooks
from keras_custom.hooks.guards import first_nonfinite

npv = keras.ops.convert_to_numpy


def batches(n=4, size=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n * size, 6)).astype("float32")
    y = rng.normal(size=(n * size, 1)).astype("float32")
    return x, y


def opt_state(model):
    return [npv(v).copy() for v in model.optimizer.variables]


special = st.sampled_from([0.0, 1.0, -2.5, np.nan, np.inf, -np.inf])


@settings(max_examples=80, deadline=None)
@given(
    st.one_of(st.none(), special),
    st.lists(hnp.arrays(np.float32, st.integers(0, 4), elements=special), max_size=4),
)
def test_first_nonfinite_matches_numpy(loss, grads):
    code = int(first_nonfinite(None if loss is None else np.float32(loss), grads))
    flags = [loss is not None and not np.isfinite(loss)]
    flags += [not np.all(np.isfinite(g)) for g in grads]
    expected = flags.index(True) if any(flags) else -1
    assert code == expected
    assert bool(hooks.all_finite(grads)) == all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_nan_batch_equals_run_without_it(jit_compile):
    x, y = batches()
    bad = x.copy()
    bad[8:16, 2] = np.nan  # the second of four batches
    keep = np.r_[0:8, 16:32]

    guarded = mlp()
    guarded.compile("adam", "mse", hooks=[hooks.SkipNonFinite()], jit_compile=jit_compile)
    history = guarded.fit(bad, y, batch_size=8, shuffle=False, epochs=2, verbose=0)

    plain = mlp()  # same seed, same initial weights
    plain.compile("adam", "mse", jit_compile=jit_compile)
    plain.fit(x[keep], y[keep], batch_size=8, shuffle=False, epochs=2, verbose=0)

    assert history.history["skipped_steps"] == [1.0, 1.0]
    assert int(guarded.optimizer.iterations) == int(plain.optimizer.iterations) == 6
    for a, b in zip(guarded.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(opt_state(guarded), opt_state(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd_momentum", "lso"])
def test_nan_batch_leaves_weights_and_optimizer_bit_identical(optimizer):
    x, y = batches()
    opt = {
        "adam": lambda: keras.optimizers.Adam(0.01),
        "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
        "sgd_momentum": lambda: keras.optimizers.SGD(0.01, momentum=0.9),
        "lso": lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01)),
    }[optimizer]()
    model = mlp()
    model.compile(opt, "mse", hooks=[hooks.SkipNonFinite()])
    model.train_on_batch(x[:8], y[:8])  # slots are non-zero now
    weights, state = model.get_weights(), opt_state(model)
    step = int(model.optimizer.iterations)
    y_bad = y[:8].copy()
    y_bad[3] = np.inf
    logs = model.train_on_batch(x[:8], y_bad, return_dict=True)
    assert logs["skipped_steps"] == 1.0
    assert int(model.optimizer.iterations) == step
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    names = [v.path for v in model.optimizer.variables]
    for name, a, b in zip(names, opt_state(model), state):
        if optimizer == "lso" and "dynamic_scale" in name or "step_counter" in name:
            continue  # the loss scale may be lowered, as it must to recover
        np.testing.assert_array_equal(a, b, err_msg=name)
    model.train_on_batch(x[:8], y[:8])
    assert int(model.optimizer.iterations) == step + 1


def test_gradient_nan_with_finite_loss_is_skipped_and_named():
    """sqrt(|p - y|) at p == y: loss 0, gradient NaN (0 * inf)."""

    def sqrt_loss(y_true, y_pred):
        return keras.ops.mean(keras.ops.sqrt(keras.ops.abs(y_pred - y_true)))

    model = mlp()
    model.compile("sgd", sqrt_loss, hooks=[hooks.SkipNonFinite(max_consecutive=2)])
    x = np.zeros((4, 6), "float32")
    y = npv(model(x))  # exactly the prediction: loss 0
    weights = model.get_weights()
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"]) and logs["skipped_steps"] == 1.0
    assert int(model.hooks[0].consecutive) == 1
    with pytest.raises(FloatingPointError) as info:
        model.train_on_batch(x, y)
    message = str(info.value)
    assert "SkipNonFinite" in message and "max_consecutive=2" in message
    # the first variable (in model order) whose gradient is not finite
    assert "'out/kernel'" in message or "'hidden/kernel'" in message, message
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)


def test_max_consecutive_stops_fit_naming_the_loss():
    x, y = batches(n=6)
    y[16:40] = np.nan  # batches 2, 3, 4 in a row
    model = mlp()
    model.compile("adam", "mse", hooks=[hooks.SkipNonFinite(max_consecutive=3)])
    seen = []
    callback = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(batch)
    )
    with pytest.raises(FloatingPointError, match="the loss is not finite"):
        model.fit(
            x, y, batch_size=8, shuffle=False, epochs=3, verbose=0, callbacks=[callback]
        )
    assert seen == [0, 1, 2, 3, 4]  # stopped right after the third skip in a row
    assert int(model.optimizer.iterations) == 2
    # the error resets the guard: fixed data trains again
    y[16:40] = 0.0
    model.fit(x, y, batch_size=8, shuffle=False, epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == 8


def test_fewer_than_max_consecutive_in_a_row_do_not_stop():
    x, y = batches(n=6)
    y[8:24] = np.nan  # two in a row, then good batches
    y[40:48] = np.nan
    model = mlp()
    model.compile("sgd", "mse", hooks=[hooks.SkipNonFinite(max_consecutive=3)])
    history = model.fit(x, y, batch_size=8, shuffle=False, epochs=2, verbose=0)
    assert history.history["skipped_steps"] == [3.0, 3.0]
    assert int(model.optimizer.iterations) == 6


@only_backends("tensorflow", "jax")  # Keras: steps_per_execution=1 on torch
def test_steps_per_execution_trips_inside_one_call():
    x, y = batches(n=4)
    y[0:16] = np.nan  # batches 0 and 1, then good ones in the same call
    model = mlp()
    model.compile(
        "sgd",
        "mse",
        hooks=[hooks.SkipNonFinite(max_consecutive=2)],
        steps_per_execution=4,
    )
    weights = model.get_weights()
    with pytest.raises(FloatingPointError, match="max_consecutive=2"):
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    # once tripped, the later good batches of the same call were not applied
    assert int(model.optimizer.iterations) == 0
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)


def test_save_load_keeps_config_and_counter(tmp_path):
    x, y = batches()
    model = mlp()
    model.compile("adam", "mse", hooks=[hooks.SkipNonFinite(max_consecutive=5)])
    model.train_on_batch(x[:8], y[:8])
    y_bad = y[:8].copy()
    y_bad[0] = np.nan
    model.train_on_batch(x[:8], y_bad)
    model.save(tmp_path / "guard.keras")
    restored = keras.models.load_model(tmp_path / "guard.keras")
    (hook,) = restored.hooks
    assert isinstance(hook, hooks.SkipNonFinite)
    assert hook.get_config() == model.hooks[0].get_config()
    assert int(npv(hook.consecutive)) == 1
    for a, b in zip(opt_state(restored), opt_state(model)):
        np.testing.assert_array_equal(a, b)
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    restored.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_outside_window_nothing_is_skipped():
    x, y = batches()
    y_bad = y[:8].copy()
    y_bad[0] = np.nan
    model = mlp()
    model.compile("sgd", "mse", hooks=[hooks.SkipNonFinite(start_step=1)])
    logs = model.train_on_batch(x[:8], y_bad, return_dict=True)  # step 0: inactive
    assert int(model.optimizer.iterations) == 1
    assert logs["skipped_steps"] == 0.0
    assert np.isnan(model.get_weights()[0]).any()


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3"])
def test_bad_max_consecutive(value):
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"SkipNonFinite: `max_consecutive` must be None or an integer "
            f">= 1. Received: max_consecutive={value!r}"
        ),
    ):
        hooks.SkipNonFinite(max_consecutive=value)


def test_bad_window():
    with pytest.raises(ValueError, match="SkipNonFinite: `stop_step` must be greater"):
        hooks.SkipNonFinite(start_step=3, stop_step=3)
