"""`keras.distribution.DataParallel` on two (fake) CPU devices, JAX backend.

Gradient hooks must see the gradient of the global batch: a run sharded over two
devices matches the single-device run, hook state and logs included. Run by
`tests/run.py` in a process of its own (XLA_FLAGS must be set before JAX starts).
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
)

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_custom as kc  # noqa: E402
from keras_custom import hooks  # noqa: E402

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="keras.distribution on JAX"
)


def data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(48, 5)).astype("float32")
    y = (np.tanh(x @ rng.normal(size=(5, 2))) + 0.1).astype("float32")
    weights = [
        rng.normal(scale=0.5, size=(5, 8)).astype("float32"),
        np.zeros(8, "float32"),
        rng.normal(scale=0.5, size=(8, 2)).astype("float32"),
        np.zeros(2, "float32"),
    ]
    return x, y, weights


def train(distribution, attached=False):
    """`attached`: a plain `keras.Sequential` given the hooks by `kc.attach`."""
    keras.distribution.set_distribution(distribution)
    try:
        x, y, weights = data()
        model = (keras.Sequential if attached else kc.Sequential)(
            [
                keras.Input((5,)),
                keras.layers.Dense(8, activation="relu", name="d1"),
                keras.layers.Dense(2, name="d2"),
            ]
        )
        model.set_weights(weights)
        guard = hooks.SkipNonFinite(max_consecutive=3)
        stack = [
            hooks.WeightPenalty(l2=1e-2),
            guard,
            hooks.GradientNoise(eta=1e-3, seed=7),
            hooks.LogGradNorm(name="grad_norm_raw"),
            hooks.ClipByGlobalNorm(0.3),  # active: raw norms are larger
            hooks.LogGradNorm(),
        ]
        if attached:
            model.compile(keras.optimizers.Adam(0.05), "mse")
            kc.attach(model, stack)
        else:
            model.compile(keras.optimizers.Adam(0.05), "mse", hooks=stack)
        history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        # A bad batch: skipped, counted, on both replicas alike.
        bad = model.train_on_batch(np.full_like(x[:8], np.nan), y[:8], return_dict=True)
        sharding = model.trainable_variables[0].value.sharding
        state = [np.asarray(v) for h in model.hooks for v in h.variables]
        return model, history.history, bad, state, sharding
    finally:
        keras.distribution.set_distribution(None)


def test_two_devices_match_one_device():
    devices = jax.devices("cpu")
    assert len(devices) == 2, "XLA_FLAGS did not give two CPU devices"
    single, single_logs, single_bad, single_state, _ = train(None)
    dp = keras.distribution.DataParallel(devices=devices)
    model, logs, bad, state, sharding = train(dp)
    assert len(sharding.device_set) == 2  # really on both devices
    assert int(model.optimizer.iterations) == int(single.optimizer.iterations) == 12
    assert bad["skipped_steps"] == single_bad["skipped_steps"] == 1.0
    for got, want in zip(model.get_weights(), single.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert logs.keys() == single_logs.keys()
    for key in ("loss", "weight_penalty", "grad_norm", "grad_norm_raw"):
        np.testing.assert_allclose(logs[key], single_logs[key], rtol=1e-6)
    assert logs["skipped_steps"] == single_logs["skipped_steps"] == [0.0, 0.0]
    assert max(logs["grad_norm"]) <= 0.3 + 1e-6 < min(logs["grad_norm_raw"])
    # Hook state (skip counter, noise seed, strengths) crossed the sharded step
    # and came back: the same as on one device.
    assert len(state) == len(single_state) > 0
    for a, b in zip(state, single_state):
        np.testing.assert_array_equal(a, b)
    guard = model.hooks[1]
    assert int(np.asarray(guard.consecutive)) == 1


def train_recipes(distribution):
    keras.distribution.set_distribution(distribution)
    try:
        x, y, weights = data()
        model = kc.Sequential(
            [
                keras.Input((5,)),
                keras.layers.Dense(8, activation="relu", name="d1"),
                keras.layers.Dense(2, name="d2"),
            ]
        )
        model.set_weights(weights)
        model.compile(
            keras.optimizers.Adam(0.05),
            "mse",
            hooks=[
                hooks.SkipNonFinite(),
                hooks.GradientCentralization(),
                hooks.ScaleGradients({"d1": 0.5}),
                hooks.LayerwiseDecay(0.5),
                hooks.Lookahead(k=2),
                hooks.WeightAverage(decay=0.9, validate_with_average=True),
            ],
        )
        history = model.fit(
            x,
            y,
            batch_size=8,
            epochs=2,
            validation_data=(x[:16], y[:16]),
            shuffle=False,
            verbose=0,
        )
        model.train_on_batch(np.full_like(x[:8], np.nan), y[:8])  # skipped
        state = [np.asarray(v) for h in model.hooks[1:] for v in h.variables]
        return model, history.history, state
    finally:
        keras.distribution.set_distribution(None)


def test_training_recipes_match_one_device():
    """Averages, slow weights and scaled updates see the global batch's update."""
    single, single_logs, single_state = train_recipes(None)
    dp = keras.distribution.DataParallel(devices=jax.devices("cpu"))
    model, logs, state = train_recipes(dp)
    assert model.hooks[-1].count == single.hooks[-1].count == 12
    for got, want in zip(model.get_weights(), single.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logs["val_loss"], single_logs["val_loss"], rtol=1e-5)
    assert len(state) == len(single_state) > 0
    for a, b in zip(state, single_state):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_attached_model_on_two_devices_matches_one_device():
    """`kc.attach` on a plain `keras.Sequential`, sharded: the single-device result
    of the same model built from `kc.Sequential`."""
    single, single_logs, single_bad, single_state, _ = train(None)
    dp = keras.distribution.DataParallel(devices=jax.devices("cpu"))
    model, logs, bad, state, sharding = train(dp, attached=True)
    assert type(model).__name__ == "Sequential" and isinstance(model, keras.Sequential)
    assert isinstance(model, keras.Sequential) and hasattr(model, "hooks")
    assert len(sharding.device_set) == 2
    assert bad["skipped_steps"] == single_bad["skipped_steps"] == 1.0
    for got, want in zip(model.get_weights(), single.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert logs.keys() == single_logs.keys()
    for key in logs:
        np.testing.assert_allclose(logs[key], single_logs[key], rtol=1e-6)
    assert len(state) == len(single_state) > 0
    for a, b in zip(state, single_state):
        np.testing.assert_array_equal(a, b)
