"""Shared test set-up: quiet TensorFlow start-up, tiny data, tiny models."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.backend.backend()
KERAS_VERSION = tuple(int(p) for p in keras.version().split(".")[:2])


def only_backends(*names):
    """Skip a test unless Keras runs on one of `names`."""
    return pytest.mark.skipif(
        BACKEND not in names, reason=f"{BACKEND} backend: test is for {names}"
    )


def requires_keras(major, minor, why):
    """Skip a test on a Keras older than `major.minor` (for what it lacks)."""
    return pytest.mark.skipif(
        KERAS_VERSION < (major, minor),
        reason=f"Keras {keras.version()}: {why} (from Keras {major}.{minor})",
    )


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1)) + 0.1).astype("float32")
    return x, y


def mlp(cls=None, seed=0, units=8, name=None):
    """A two-layer functional model (`cls` is `keras.Model` or `kc.Model`)."""
    import keras_custom as kc

    cls = cls or kc.Model
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,), name="x")
    h = keras.layers.Dense(units, activation="tanh", name="hidden")(inputs)
    outputs = keras.layers.Dense(1, name="out")(h)
    return cls(inputs, outputs, name=name)


def weights_of(model):
    return [np.array(w) for w in model.get_weights()]


def assert_weights_equal(a, b, rtol=0.0, atol=0.0):
    wa, wb = weights_of(a), weights_of(b)
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


# Files in tests/isolated/ configure devices or global state before Keras starts
# (two logical CPUs, several workers): `tests/run.py` runs each in its own process.
collect_ignore = [] if os.environ.get("KC_ISOLATED") else ["isolated"]
