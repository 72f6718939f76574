"""The gradient stage a hook may take over (`Hook.compute_gradients`) and the
callbacks a hook adds to `fit` (`Hook.callbacks`), on every backend."""

import re

import keras
import numpy as np
import pytest
from conftest import mlp

import keras_custom as kc
from keras_custom import hooks


class Halve(kc.Hook):
    """Takes the gradients over: the model's own, halved; records who computed them."""

    seen = []

    def compute_gradients(self, model, x, y, sample_weight, variables):
        y_pred, loss, grads = super().compute_gradients(
            model, x, y, sample_weight, variables
        )
        return y_pred, loss, [keras.ops.multiply(g, 0.5) for g in grads]

    def process_gradients(self, grads, variables, step):
        Halve.seen.append(self.step_state.gradient_hook is self)
        return grads


def test_a_hook_computes_the_gradients_and_the_rest_of_the_step_is_the_models(data):
    x, y = data
    plain = mlp()
    plain.compile(keras.optimizers.SGD(0.05), "mse", hooks=[hooks.LogGradNorm()])
    halved = mlp()
    halved.compile(keras.optimizers.SGD(0.1), "mse", hooks=[Halve(), hooks.LogGradNorm()])
    Halve.seen.clear()
    a = plain.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    b = halved.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    # lr 0.1 on half the gradient is lr 0.05 on the gradient: same weights.
    for wa, wb in zip(plain.get_weights(), halved.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.history["loss"], b.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(
        b.history["grad_norm"], np.asarray(a.history["grad_norm"]) / 2, rtol=1e-5
    )
    assert Halve.seen and all(Halve.seen)


def test_one_gradient_hook_per_model_and_no_window():
    model = mlp()
    with pytest.raises(
        ValueError,
        match=re.escape(
            "compile: hooks[0] Halve(name='a') and hooks[2] Halve(name='b') both "
            "compute the gradients"
        ),
    ):
        model.compile(
            "sgd", "mse", hooks=[Halve(name="a"), hooks.LogGradNorm(), Halve(name="b")]
        )
    with pytest.raises(ValueError, match=re.escape("start_step=3, stop_step=None")):
        model.compile("sgd", "mse", hooks=[Halve(start_step=3)])
    assert model.hooks == []


class EpochValue(kc.Hook):
    """Adds a value computed in Python at each epoch's end to the logs."""

    def callbacks(self):
        class Add(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                logs["python_value"] = 10.0 + epoch

        if not hasattr(self, "_add"):
            self._add = Add()
        return [self._add]


def test_hook_callbacks_run_before_the_users(data):
    x, y = data
    seen = []

    class User(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(logs.get("python_value"))

    model = mlp()
    model.compile("sgd", "mse", hooks=[EpochValue()])
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=[User()])
    assert seen == [10.0, 11.0]
    assert history.history["python_value"] == [10.0, 11.0]
    as_list = keras.callbacks.CallbackList([User()], add_history=True, model=model)
    model.fit(x, y, epochs=1, verbose=0, callbacks=as_list)
    assert seen[-1] == 10.0
