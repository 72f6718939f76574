"""`keras.Model = kc.Model`: the quickest way to adopt ours in existing code.

This file rebinds `keras.Model` and `keras.Sequential` for its whole process (so
it runs in a process of its own, from `tests/run.py`). Functional models,
subclasses, Sequential models and a subclass with its own `train_step` (as the
keras-io guide "Customizing what happens in fit()" writes it for each backend)
must train exactly as plain Keras trains them.
"""

import keras
import numpy as np

import keras_custom as kc

PLAIN_MODEL, PLAIN_SEQUENTIAL = keras.Model, keras.Sequential
BACKEND = keras.backend.backend()


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype("float32")
    return x, (x @ rng.normal(size=(5, 1))).astype("float32")


def functional(model_cls):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    return model_cls(inputs, keras.layers.Dense(1)(hidden))


def sequential(sequential_cls):
    keras.utils.set_random_seed(2)
    return sequential_cls(
        [keras.Input((5,)), keras.layers.Dense(4), keras.layers.Dense(1)]
    )


def subclass(base):
    class Net(base):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(8, activation="tanh")
            self.out = keras.layers.Dense(1)

        def call(self, x):
            return self.out(self.hidden(x))

    keras.utils.set_random_seed(3)
    return Net()


def custom_step(base):
    """A subclass with its own `train_step`, as the keras-io guide writes it."""

    if BACKEND == "tensorflow":
        import tensorflow as tf

        class Custom(base):
            def train_step(self, data):
                x, y = data
                with tf.GradientTape() as tape:
                    y_pred = self(x, training=True)
                    loss = self.compute_loss(y=y, y_pred=y_pred)
                grads = tape.gradient(loss, self.trainable_variables)
                self.optimizer.apply(grads, self.trainable_variables)
                for metric in self.metrics:
                    if metric.name == "loss":
                        metric.update_state(loss)
                    else:
                        metric.update_state(y, y_pred)
                return {m.name: m.result() for m in self.metrics}

    elif BACKEND == "jax":
        import jax

        class Custom(base):
            def compute_loss_and_updates(self, tv, ntv, x, y, training=False):
                y_pred, ntv = self.stateless_call(tv, ntv, x, training=training)
                loss = self.compute_loss(y=y, y_pred=y_pred)
                return loss, (y_pred, ntv)

            def train_step(self, state, data):
                tv, ntv, ov, mv = state
                x, y = data
                grad_fn = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)
                (loss, (y_pred, ntv)), grads = grad_fn(tv, ntv, x, y, training=True)
                tv, ov = self.optimizer.stateless_apply(ov, grads, tv)
                new_mv = []
                logs = {}
                for metric in self.metrics:
                    n = len(metric.variables)
                    current, mv = mv[:n], mv[n:]
                    if metric.name == "loss":
                        current = metric.stateless_update_state(current, loss)
                    else:
                        current = metric.stateless_update_state(current, y, y_pred)
                    logs[metric.name] = metric.stateless_result(current)
                    new_mv += current
                return logs, (tv, ntv, ov, new_mv + list(mv))

    else:
        import torch

        class Custom(base):
            def train_step(self, data):
                x, y = data
                self.zero_grad()
                y_pred = self(x, training=True)
                loss = self.compute_loss(y=y, y_pred=y_pred)
                loss.backward()
                trainable = list(self.trainable_weights)
                grads = [v.value.grad for v in trainable]
                with torch.no_grad():
                    self.optimizer.apply(grads, trainable)
                for metric in self.metrics:
                    if metric.name == "loss":
                        metric.update_state(loss)
                    else:
                        metric.update_state(y, y_pred)
                return {m.name: m.result() for m in self.metrics}

    keras.utils.set_random_seed(4)
    inputs = keras.Input((5,))
    return Custom(inputs, keras.layers.Dense(1)(inputs))


def losses(model):
    x, y = data()
    model.compile(keras.optimizers.SGD(0.05), "mse")
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    return history.history["loss"]


def test_rebinding_trains_as_plain_keras():
    plain = {
        "functional": losses(functional(PLAIN_MODEL)),
        "sequential": losses(sequential(PLAIN_SEQUENTIAL)),
        "subclass": losses(subclass(PLAIN_MODEL)),
        "custom_step": losses(custom_step(PLAIN_MODEL)),
    }
    keras.Model, keras.Sequential = kc.Model, kc.Sequential
    try:
        ours = {
            "functional": functional(keras.Model),
            "sequential": sequential(keras.Sequential),
            "subclass": subclass(keras.Model),
            "custom_step": custom_step(keras.Model),
        }
        for name, model in ours.items():
            assert isinstance(model, kc.Model if name != "sequential" else kc.Sequential)
            assert losses(model) == plain[name], name
    finally:
        keras.Model, keras.Sequential = PLAIN_MODEL, PLAIN_SEQUENTIAL
