"""Hooks add no traces: none per batch or epoch, no more than plain Keras makes."""

import keras
import numpy as np
from conftest import only_backends

import keras_custom as kc
from keras_custom import hooks


def counting(base):
    class Counting(base):
        traces = {"train": 0, "test": 0}

        def train_step(self, *args):
            type(self).traces["train"] += 1
            return super().train_step(*args)

        def test_step(self, *args):
            type(self).traces["test"] += 1
            return super().test_step(*args)

    Counting.traces = {"train": 0, "test": 0}
    return Counting


def build(cls):
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    return cls(inputs, keras.layers.Dense(1, name="out")(hidden))


@only_backends("tensorflow", "jax")
def test_no_more_traces_than_plain_keras(data):
    x, y = data
    counts = {}
    for name, base, kwargs in [
        ("keras", keras.Model, {}),
        (
            "ours",
            kc.Model,
            {
                "hooks": [
                    hooks.WeightPenalty(l2=1e-4, start_step=2),
                    hooks.LogGradNorm(name="grad_norm_raw"),
                    hooks.ClipByGlobalNorm(0.5, stop_step=5),
                    hooks.LogGradNorm(per_layer=True),
                    hooks.LogWeightNorm(),
                    hooks.LogLearningRate(),
                ]
            },
        ),
    ]:
        cls = counting(base)
        model = build(cls)
        model.compile(keras.optimizers.Adam(1e-3), "mse", **kwargs)
        model.fit(x, y, batch_size=16, epochs=3, validation_split=0.25, verbose=0)
        model.evaluate(x, y, verbose=0)
        counts[name] = dict(cls.traces)
    assert counts["ours"]["train"] <= counts["keras"]["train"], counts
    assert counts["ours"]["test"] <= counts["keras"]["test"], counts
    assert counts["ours"]["train"] <= 2, counts  # none per batch or epoch


@only_backends("tensorflow", "jax")
def test_recompile_traces_again(data):
    x, y = data
    cls = counting(kc.Model)
    model = build(cls)
    model.compile("sgd", "mse", hooks=[hooks.LogGradNorm()])
    model.fit(x, y, epochs=1, verbose=0)
    first = cls.traces["train"]
    model.compile("sgd", "mse", hooks=[hooks.ClipByValue(1e-6), hooks.LogGradNorm()])
    h = model.fit(x, y, epochs=1, verbose=0).history
    assert cls.traces["train"] > first
    assert (
        h["grad_norm"][0] <= np.sqrt(sum(np.prod(w.shape) for w in model.weights)) * 1e-6
    )
