"""Gradient accumulation: the hooks act on the accumulated gradient.

With `optimizer.gradient_accumulation_steps=N` (Keras's own switch) the model
accumulates the gradients itself: N micro-batches make one update, equal to one
step on the N-times batch, clipping included, and `step` counts updates.
"""

import keras
import numpy as np
import pytest
from conftest import mlp

import keras_custom as kc
from keras_custom import hooks


def _rel(ws, expected):
    a = np.concatenate([np.ravel(w) for w in ws])
    b = np.concatenate([np.ravel(w) for w in expected])
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _hooks():
    return [
        hooks.LogGradNorm(name="grad_norm_raw"),
        hooks.ClipByGlobalNorm(0.3),
        hooks.LogGradNorm(),
    ]


def _train(
    data, batch_size, steps=None, make_hooks=_hooks, epochs=2, cls=kc.Model, clipnorm=None
):
    x, y = data
    model = mlp(cls)
    optimizer = keras.optimizers.SGD(
        0.05, momentum=0.9, gradient_accumulation_steps=steps, global_clipnorm=clipnorm
    )
    kwargs = {} if cls is keras.Model else {"hooks": make_hooks()}
    model.compile(optimizer, "mse", **kwargs)
    history = model.fit(
        x[:32],
        5.0 * y[:32],
        batch_size=batch_size,
        epochs=epochs,
        shuffle=False,
        verbose=0,
    )
    return model, history.history


def test_micro_batches_equal_one_big_batch_with_clipping(data):
    big, big_logs = _train(data, batch_size=16)
    acc, acc_logs = _train(data, batch_size=8, steps=2)
    assert big_logs["grad_norm_raw"][0] > 0.3  # the clip bites
    assert _rel(acc.get_weights(), big.get_weights()) <= 1e-6
    np.testing.assert_allclose(
        acc_logs["grad_norm_raw"], big_logs["grad_norm_raw"], rtol=1e-5
    )
    np.testing.assert_allclose(acc_logs["grad_norm"], big_logs["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(acc_logs["loss"], big_logs["loss"], rtol=1e-5)
    # `step` and `optimizer.iterations` count updates, not micro-batches.
    assert int(acc.optimizer.iterations) == int(big.optimizer.iterations) == 4
    assert acc.gradient_accumulation_steps == 2
    assert acc.optimizer.gradient_accumulation_steps is None  # taken over


def test_without_hooks_matches_keras_accumulation(data):
    plain, _ = _train(data, batch_size=8, steps=4, cls=keras.Model)
    ours, _ = _train(data, batch_size=8, steps=4, make_hooks=list)
    assert _rel(ours.get_weights(), plain.get_weights()) <= 1e-6
    assert int(ours.optimizer.iterations) == int(plain.optimizer.iterations) == 2


def test_keras_would_clip_micro_batches_not_ours(data):
    """Without the take-over a hook would see micro-batch gradients: the clipped
    result would differ from the big batch's. Keras's own optimizer clipping acts
    on the accumulated gradient too, so both agree here."""
    big, _ = _train(data, batch_size=16, make_hooks=list, clipnorm=0.3)
    keras_acc, _ = _train(data, batch_size=8, steps=2, cls=keras.Model, clipnorm=0.3)
    ours, _ = _train(data, batch_size=8, steps=2)
    assert _rel(keras_acc.get_weights(), big.get_weights()) <= 1e-6
    assert _rel(ours.get_weights(), big.get_weights()) <= 1e-6
    naive, _ = _train(data, batch_size=8)  # clipping each micro-batch, no accumulation
    assert _rel(naive.get_weights(), big.get_weights()) > 1e-3


def test_skip_drops_the_whole_accumulated_update(data):
    x, y = data
    x = x[:32].copy()
    x[9] = np.nan  # in the second micro-batch of the first update
    model = mlp(kc.Model)
    model.compile(
        keras.optimizers.SGD(0.05, gradient_accumulation_steps=2),
        "mse",
        hooks=[hooks.SkipNonFinite()],
    )
    history = model.fit(x, y[:32], batch_size=8, shuffle=False, verbose=0)
    assert history.history["skipped_steps"] == [1.0]
    assert int(model.optimizer.iterations) == 1
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_round_trip_in_the_middle_of_an_accumulation(data, tmp_path):
    x, y = data
    x, y = x[:24], y[:24]  # 3 micro-batches of 8: the epoch ends mid-update

    def make():
        model = mlp(kc.Model)
        model.compile(
            keras.optimizers.Adam(0.01, gradient_accumulation_steps=2),
            "mse",
            hooks=[hooks.ClipByGlobalNorm(0.3)],
        )
        return model

    a = make()
    a.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    path = str(tmp_path / "acc.keras")
    a.save(path)
    b = keras.models.load_model(path)
    assert b.gradient_accumulation_steps == 2
    assert (
        b.get_compile_config()["optimizer"]["config"]["gradient_accumulation_steps"] == 2
    )
    for model in (a, b):
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert int(b.optimizer.iterations) == 3  # 6 micro-batches


def test_built_optimizer_with_accumulation_is_refused(data):
    optimizer = keras.optimizers.SGD(gradient_accumulation_steps=2)
    first = mlp(kc.Model)
    optimizer.build(first.trainable_variables)
    model = mlp(kc.Model)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2"):
        model.compile(optimizer, "mse")
    assert not model.compiled
