"""GradientNoise: annealed Gaussian noise, reproducible and resumable."""

import re

import keras
import numpy as np
import pytest
from conftest import mlp
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_custom import hooks

npv = keras.ops.convert_to_numpy


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**6), st.floats(1e-4, 10.0), st.floats(0.0, 2.0))
def test_noise_stddev_matches_numpy(step, eta, gamma):
    expected = np.sqrt(eta / (1.0 + step) ** gamma)
    assert float(hooks.noise_stddev(step, eta, gamma)) == pytest.approx(
        expected, rel=1e-5
    )


def test_add_gradient_noise_statistics_and_reproducibility():
    g = np.full((200, 100), 3.0, "float32")
    out = npv(hooks.add_gradient_noise([g, None], 0.5, keras.random.SeedGenerator(7))[0])
    noise = out - g
    assert abs(noise.mean()) < 0.02
    assert noise.var() == pytest.approx(0.25, rel=0.05)
    again = npv(hooks.add_gradient_noise([g], 0.5, keras.random.SeedGenerator(7))[0])
    np.testing.assert_array_equal(out, again)
    other = npv(hooks.add_gradient_noise([g], 0.5, keras.random.SeedGenerator(8))[0])
    assert not np.allclose(out, other)


def zero_loss(y_true, y_pred):
    """A loss whose gradient is exactly zero: the update is the noise alone."""
    return keras.ops.mean(y_pred) * 0.0


def wide(seed=0):
    import keras_custom as kc

    keras.utils.set_random_seed(seed)
    return kc.Sequential([keras.Input((6,)), keras.layers.Dense(2000, name="wide")])


def test_variance_follows_the_schedule():
    eta, gamma = 0.04, 0.55
    model = wide()
    model.compile(
        keras.optimizers.SGD(1.0),
        zero_loss,
        hooks=[hooks.GradientNoise(eta, gamma, seed=3)],
    )
    x = np.ones((4, 6), "float32")
    y = np.zeros((4, 2000), "float32")
    for step in range(4):
        before = npv(model.get_layer("wide").kernel).copy()
        model.train_on_batch(x, y)
        update = before - npv(model.get_layer("wide").kernel)  # 12000 samples
        assert update.var() == pytest.approx(eta / (1 + step) ** gamma, rel=0.06), step
        assert abs(update.mean()) < 0.01


def fitted(seed, epochs, data):
    model = mlp()
    model.compile("sgd", "mse", hooks=[hooks.GradientNoise(0.1, seed=seed)])
    model.fit(*data, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    return model


def test_same_seed_same_run_other_seed_other_run(data):
    a, b, c = fitted(1, 1, data), fitted(1, 1, data), fitted(2, 1, data)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert not np.allclose(a.get_weights()[0], c.get_weights()[0])


def test_save_and_resume_continues_the_stream(data, tmp_path):
    straight = fitted(5, 2, data)
    first = fitted(5, 1, data)
    path = tmp_path / "noise.keras"
    first.save(path)
    resumed = keras.models.load_model(path)
    (hook,) = resumed.hooks
    assert isinstance(hook, hooks.GradientNoise)
    assert hook.get_config() == first.hooks[0].get_config()
    np.testing.assert_array_equal(
        npv(hook.seed_generator.state), npv(first.hooks[0].seed_generator.state)
    )
    resumed.fit(*data, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(resumed.get_weights(), straight.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # without the saved stream (a fresh hook, same seed) the noise would repeat
    fresh = fitted(5, 1, data)
    fresh.compile("sgd", "mse", hooks=[hooks.GradientNoise(0.1, seed=5)])
    fresh.fit(*data, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert not np.allclose(fresh.get_weights()[0], straight.get_weights()[0], atol=1e-6)


def noise_of_first_step(global_seed):
    model = wide()
    keras.utils.set_random_seed(global_seed)
    model.compile(keras.optimizers.SGD(1.0), zero_loss, hooks=[hooks.GradientNoise()])
    before = npv(model.get_layer("wide").kernel).copy()
    model.train_on_batch(np.ones((2, 6), "float32"), np.zeros((2, 2000), "float32"))
    return before - npv(model.get_layer("wide").kernel)


def test_seed_none_follows_the_global_seed():
    a, b, c = noise_of_first_step(1), noise_of_first_step(1), noise_of_first_step(2)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert a.var() == pytest.approx(0.01, rel=0.06)


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (
            {"eta": 0.0},
            "GradientNoise: `eta` must be a finite float > 0. Received: eta=0.0",
        ),
        ({"eta": -1}, "eta=-1"),
        (
            {"gamma": -0.1},
            "GradientNoise: `gamma` must be a finite float >= 0. Received: gamma=-0.1",
        ),
        ({"gamma": float("inf")}, "gamma=inf"),
        ({"gamma": "x"}, "gamma='x'"),
        (
            {"seed": -3},
            "GradientNoise: `seed` must be None or an integer >= 0. Received: seed=-3",
        ),
        ({"seed": 1.5}, "seed=1.5"),
    ],
)
def test_bad_arguments(kwargs, text):
    with pytest.raises((ValueError, TypeError), match=re.escape(text)):
        hooks.GradientNoise(**kwargs)
