"""Nothing lost: a skipped update changes no variable of the model, the optimizer
or the hooks (only a guard's own counters and the logs move)."""

import keras
import numpy as np
import pytest
from conftest import BACKEND

import keras_custom as kc
from keras_custom import hooks


def bn_model(seed=0):
    keras.utils.set_random_seed(seed)
    return kc.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, name="d1"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Dense(1, name="d2"),
        ]
    )


def values(variables):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def test_the_issue_reproduction_bn_stays_finite():
    """The reproduction from the issue: a NaN in `x` is skipped and BatchNorm's
    moving statistics stay finite."""
    m = bn_model()
    m.compile("adam", "mse", hooks=[hooks.SkipNonFinite()])
    x = np.random.default_rng(0).random((32, 3)).astype("float32")
    x[8] = np.nan
    m.fit(x, np.ones((32, 1)), batch_size=8, shuffle=False, verbose=0)
    bn = m.get_layer("bn")
    assert np.isfinite(values([bn.moving_mean, bn.moving_variance])).all()
    assert np.isfinite(m.predict(x[:8], verbose=0)).all()


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_skipped_step_changes_no_variable(optimizer):
    noise = hooks.GradientNoise(eta=1e-3, seed=4)
    guard = hooks.SkipNonFinite()
    m = bn_model()
    m.compile(optimizer, "mse", hooks=[guard, noise, hooks.ClipByGlobalNorm(1.0)])
    rng = np.random.default_rng(1)
    x, y = rng.random((8, 3)).astype("float32"), rng.random((8, 1)).astype("float32")
    m.train_on_batch(x, y)  # a good step: everything exists and has moved once
    every = list(m.variables) + list(m.optimizer.variables) + noise.variables
    before = values(every)
    bad = x.copy()
    bad[3, 1] = np.nan
    logs = m.train_on_batch(bad, y, return_dict=True)
    assert float(logs["skipped_steps"]) == 1.0
    for a, b in zip(before, values(every)):
        np.testing.assert_array_equal(a, b)


def test_a_run_with_bad_batches_ends_where_the_run_without_them_ends():
    """Bad batches leave no trace: not in the weights, not in BatchNorm's
    statistics, not in the noise stream (the generator does not advance)."""
    rng = np.random.default_rng(2)
    x = rng.random((24, 3)).astype("float32")
    y = rng.random((24, 1)).astype("float32")
    bad_x = np.full((8, 3), np.nan, "float32")
    bad_y = np.ones((8, 1), "float32")

    def run(with_bad):
        m = bn_model(seed=3)
        noise = hooks.GradientNoise(eta=1e-2, seed=7)
        m.compile("adam", "mse", hooks=[hooks.SkipNonFinite(), noise])
        for i in range(3):
            if with_bad and i == 1:
                m.train_on_batch(bad_x, bad_y)
            m.train_on_batch(x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8])
        return values(list(m.variables) + list(m.optimizer.variables) + noise.variables)

    for a, b in zip(run(False), run(True)):
        np.testing.assert_array_equal(a, b)


def test_guard_counters_keep_counting_skipped_steps():
    guard = hooks.SkipNonFinite(max_consecutive=5)
    m = bn_model()
    m.compile("sgd", "mse", hooks=[guard])
    bad = np.full((4, 3), np.nan, "float32")
    for _ in range(2):
        m.train_on_batch(bad, np.ones((4, 1)))
    assert int(keras.ops.convert_to_numpy(guard.consecutive)) == 2


@pytest.mark.skipif(BACKEND == "torch", reason="no steps_per_execution on torch")
def test_skips_inside_one_compiled_call_roll_back_too():
    m = bn_model()
    m.compile("adam", "mse", hooks=[hooks.SkipNonFinite()], steps_per_execution=4)
    x = np.random.default_rng(4).random((32, 3)).astype("float32")
    x[9] = np.nan
    history = m.fit(x, np.ones((32, 1)), batch_size=8, shuffle=False, verbose=0)
    assert history.history["skipped_steps"] == [1.0]
    bn = m.get_layer("bn")
    assert np.isfinite(values([bn.moving_mean, bn.moving_variance])).all()
