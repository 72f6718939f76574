"""The stages fire in the documented order, and a subclass can replace one stage."""

import keras
import numpy as np
from conftest import mlp

import keras_custom as kc
from keras_custom import hooks


class Recorder(kc.Hook):
    """Records every stage call (run eagerly, so once per step)."""

    def __init__(self, calls, **kwargs):
        super().__init__(**kwargs)
        self.calls = calls

    def build(self, model):
        self.calls.append((self.name, "build", None))

    def loss_term(self, model, x, y, y_pred, sample_weight, training):
        self.calls.append((self.name, "loss_term", bool(training)))
        return None

    def process_gradients(self, grads, variables, step):
        self.calls.append((self.name, "process_gradients", int(step)))
        return grads

    def after_update(self, model, step):
        self.calls.append((self.name, "after_update", int(step)))

    def get_config(self):  # `calls` is not serializable: tests only
        return super().get_config()


def test_order_of_stages(data):
    x, y = data
    calls = []
    model = mlp()
    model.compile(
        "sgd",
        "mse",
        run_eagerly=True,
        hooks=[Recorder(calls, name="a"), Recorder(calls, name="b")],
    )
    model.fit(
        x[:32],
        y[:32],
        batch_size=16,
        epochs=1,
        verbose=0,
        validation_data=(x[:16], y[:16]),
    )
    assert calls == [
        ("a", "build", None),
        ("b", "build", None),
        ("a", "loss_term", True),
        ("b", "loss_term", True),
        ("a", "process_gradients", 0),
        ("b", "process_gradients", 0),
        ("a", "after_update", 0),
        ("b", "after_update", 0),
        ("a", "loss_term", True),
        ("b", "loss_term", True),
        ("a", "process_gradients", 1),
        ("b", "process_gradients", 1),
        ("a", "after_update", 1),
        ("b", "after_update", 1),
        ("a", "loss_term", False),  # validation: the same loss terms, no update
        ("b", "loss_term", False),
    ]


def test_hooks_see_what_the_previous_hook_returned(data):
    x, y = data
    seen = {}

    class Spy(kc.Hook):
        def process_gradients(self, grads, variables, step):
            seen[self.name] = max(
                float(np.max(np.abs(keras.ops.convert_to_numpy(g)))) for g in grads
            )
            return grads

    model = mlp()
    model.compile(
        "sgd",
        "mse",
        run_eagerly=True,
        hooks=[Spy(name="before"), hooks.ClipByValue(1e-3), Spy(name="after")],
    )
    model.fit(x[:16], y[:16], batch_size=16, epochs=1, verbose=0)
    assert seen["before"] > 1e-3
    assert seen["after"] <= 1e-3 + 1e-9


def test_subclass_overrides_one_stage(data):
    """Zeroing the gradients in an overridden stage: the weights do not move."""
    x, y = data

    class Frozen(kc.Model):
        def process_gradients(self, grads, variables, step=None):
            grads = super().process_gradients(grads, variables, step)
            return [keras.ops.zeros_like(g) for g in grads]

    inputs = keras.Input((6,))
    model = Frozen(inputs, keras.layers.Dense(1)(inputs))
    model.compile(keras.optimizers.SGD(0.1), "mse", hooks=[hooks.LogGradNorm()])
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(x, y, epochs=1, verbose=0).history
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert history["grad_norm"][0] > 0  # the hooks still saw the real gradient


def test_subclass_overrides_forward(data):
    x, y = data

    class Doubled(kc.Model):
        def forward_pass(self, x, training):
            return 2.0 * super().forward_pass(x, training)

    inputs = keras.Input((6,))
    model = Doubled(inputs, keras.layers.Dense(1, use_bias=False)(inputs))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    loss = model.fit(x, y, batch_size=64, epochs=1, verbose=0).history["loss"][0]
    pred = 2.0 * model.predict(x, verbose=0)
    np.testing.assert_allclose(loss, np.mean((pred - y) ** 2), rtol=1e-5)


def test_window_decided_inside_the_step(data):
    """A hook with start_step/stop_step acts only inside its window."""
    x, y = data
    model = mlp()
    log = hooks.LogGradNorm(name="late", start_step=2)
    model.compile(
        keras.optimizers.SGD(0.0), "mse", hooks=[hooks.LogGradNorm(name="all"), log]
    )
    h = model.fit(x, y, batch_size=64, epochs=4, verbose=0).history
    # One step per epoch, lr 0: the same gradient every step. Before step 2 the
    # windowed hook logs nothing that counts (an empty mean reads 0).
    assert h["late"][:2] == [0.0, 0.0]
    np.testing.assert_allclose(h["late"][2:], h["all"][2:], rtol=1e-6)
    assert h["all"][0] > 0
    clip = mlp()
    clip.compile(
        keras.optimizers.SGD(0.0),
        "mse",
        hooks=[hooks.ClipByValue(1e-6, stop_step=2), hooks.LogGradNorm()],
    )
    per_batch = []

    class Grab(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            per_batch.append(logs["grad_norm"])

    clip.fit(x, x[:, :1], batch_size=64, epochs=4, verbose=0, callbacks=[Grab()])
    assert per_batch[0] < 1e-5 and per_batch[1] < 1e-5
    assert per_batch[2] > 1e-3 and per_batch[3] > 1e-3
