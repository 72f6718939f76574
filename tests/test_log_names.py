"""Nothing misread: a hook's log can never take the place of `loss`, a compiled
metric, a validation log or another hook's log."""

import re

import keras
import numpy as np
import pytest
from conftest import mlp

import keras_custom as kc
from keras_custom import hooks


@pytest.mark.parametrize(
    "hook_list, metrics, message",
    [
        (
            [hooks.LogGradNorm(name="loss")],
            None,
            "LogGradNorm(name='loss'): a hook's log cannot be called 'loss'",
        ),
        (
            [hooks.LogWeightNorm(name="mae")],
            ["mae"],
            "LogWeightNorm(name='mae'): the log name 'mae' is the name of a compiled "
            "metric",
        ),
        (
            [hooks.LogWeightNorm(name="rmse")],
            [keras.metrics.RootMeanSquaredError(name="rmse")],
            "the log name 'rmse' is the name of a compiled metric",
        ),
        (
            [hooks.LogGradNorm(), hooks.LogGradNorm()],
            None,
            "LogGradNorm(name='grad_norm') logs 'grad_norm', which "
            "LogGradNorm(name='grad_norm') logs too",
        ),
        (
            [hooks.WeightPenalty(l2=1e-3), hooks.WeightPenalty(l1=1e-3)],
            None,
            "which WeightPenalty(name='weight_penalty') logs too",
        ),
        (
            [hooks.SkipNonFinite(), hooks.SkipNonFinite()],
            None,
            "which SkipNonFinite(name='skipped_steps') logs too",
        ),
        (
            [hooks.LogLearningRate(name="val_loss")],
            None,
            "a hook's log cannot start with 'val_'",
        ),
    ],
)
def test_a_taken_name_is_refused_at_compile(hook_list, metrics, message):
    model = mlp()
    model.compile("sgd", "mse", metrics=metrics)
    before = dict(model.__dict__)
    with pytest.raises(ValueError, match=re.escape(message)):
        model.compile("sgd", "mse", metrics=metrics, hooks=hook_list)
    assert model.hooks == [] and model.__dict__.keys() == before.keys()


def test_two_hooks_of_one_kind_with_their_own_names_are_fine(data):
    x, y = data
    model = mlp()
    model.compile(
        "sgd",
        "mse",
        hooks=[
            hooks.LogGradNorm(name="grad_norm_raw"),
            hooks.ClipByGlobalNorm(1.0),
            hooks.LogGradNorm(),
        ],
    )
    history = model.fit(x, y, epochs=1, verbose=0).history
    assert {"grad_norm_raw", "grad_norm", "loss"} == set(history)
    assert history["grad_norm"][0] <= 1.0 + 1e-6 <= history["grad_norm_raw"][0] + 1


class LogsAName(kc.Hook):
    """Logs a name it never declared, found only when the step runs."""

    def __init__(self, log_as="extra", **kwargs):
        super().__init__(**kwargs)
        self.log_as = log_as

    def process_gradients(self, grads, variables, step):
        self.log(self.log_as, 1.0)
        return grads


def test_an_undeclared_name_that_collides_is_refused_in_the_step(data):
    x, y = data
    model = mlp()
    model.compile("sgd", "mse", metrics=["mae"], hooks=[LogsAName(log_as="mae")])
    with pytest.raises(ValueError, match="is the name of a compiled metric"):
        model.fit(x, y, epochs=1, verbose=0)


def test_a_metric_of_a_two_output_model_is_reserved_after_build():
    inputs = keras.Input((3,))
    model = kc.Model(
        inputs,
        {
            "a": keras.layers.Dense(1, name="a")(inputs),
            "b": keras.layers.Dense(1, name="b")(inputs),
        },
    )
    model.compile(
        "sgd",
        {"a": "mse", "b": "mse"},
        metrics={"a": ["mae"]},
        hooks=[LogsAName(log_as="a_mae")],
    )
    x = np.ones((8, 3), "float32")
    y = {"a": np.ones((8, 1), "float32"), "b": np.ones((8, 1), "float32")}
    with pytest.raises(ValueError, match="'a_mae' is the name of a compiled metric"):
        model.fit(x, y, epochs=1, verbose=0)


def test_log_value_of_the_model_is_checked_too():
    model = mlp()
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="cannot be called 'loss'"):
        model.log_value("loss", None)
