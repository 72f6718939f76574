"""Bad input: a clear error at the point of the mistake, and nothing lost."""

import re

import keras
import numpy as np
import pytest
from conftest import mlp

from keras_custom import hooks


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: hooks.ClipByGlobalNorm(0.0),
            "ClipByGlobalNorm: `max_norm` must be a finite float > 0. Received: max_norm=0.0",
        ),
        (
            lambda: hooks.ClipByGlobalNorm(-1),
            "ClipByGlobalNorm: `max_norm` must be a finite float > 0. Received: max_norm=-1.0",
        ),
        (
            lambda: hooks.ClipByNorm(-2.5),
            "ClipByNorm: `max_norm` must be a finite float > 0. Received: max_norm=-2.5",
        ),
        (
            lambda: hooks.ClipByValue(float("nan")),
            "ClipByValue: `limit` must be a finite float > 0. Received: limit=nan",
        ),
        (
            lambda: hooks.ClipByValue(float("inf")),
            "ClipByValue: `limit` must be a finite float > 0. Received: limit=inf",
        ),
        (
            lambda: hooks.WeightPenalty(l2=-1e-4),
            "WeightPenalty: `l2` must be a finite float >= 0. Received: l2=-0.0001",
        ),
        (
            lambda: hooks.WeightPenalty(),
            "WeightPenalty: at least one of `l1` and `l2` must be non-zero. Received: l1=0.0, l2=0.0",
        ),
        (
            lambda: hooks.WeightPenalty(l2=1.0, include="["),
            "WeightPenalty: `include` has an invalid regular expression '['",
        ),
        (
            lambda: hooks.LogGradNorm(start_step=-1),
            "LogGradNorm: `start_step` must be an integer >= 0. Received: start_step=-1",
        ),
        (
            lambda: hooks.ClipByValue(1.0, start_step=5, stop_step=5),
            "ClipByValue: `stop_step` must be greater than `start_step`. Received: start_step=5, stop_step=5",
        ),
        (
            lambda: hooks.LogGradNorm(per_layer="yes"),
            "LogGradNorm: `per_layer` must be a bool. Received: per_layer='yes'",
        ),
    ],
)
def test_bad_arguments(make, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        make()


def test_wrong_type_of_strength():
    with pytest.raises(
        TypeError, match=re.escape("ClipByNorm: `max_norm` must be a float or a")
    ):
        hooks.ClipByNorm("1.0")


def test_setting_a_bad_strength_later_keeps_the_old_one():
    hook = hooks.ClipByValue(1.0)
    with pytest.raises(ValueError, match="ClipByValue: `limit`"):
        hook.limit = -3.0
    assert hook.limit == 1.0


def state_of(model):
    return (
        model.compiled,
        model.hooks,
        getattr(model, "optimizer", None),
        getattr(model, "loss", None),
        model.train_function,
    )


@pytest.mark.parametrize(
    "hook_list, error, message",
    [
        (
            [hooks.ClipByValue(1.0), "clip"],
            TypeError,
            "compile: `hooks[1]` must be a keras_custom.Hook instance. Received: hooks[1]='clip' of type str",
        ),
        (
            [hooks.ClipByValue],
            TypeError,
            "compile: `hooks[0]` is the class ClipByValue, not an instance",
        ),
        (
            hooks.ClipByValue,
            TypeError,
            "compile: `hooks` must be a list of keras_custom.Hook instances. Received: hooks=ClipByValue (a class); write hooks=[ClipByValue(...)]",
        ),
        (
            42,
            TypeError,
            "compile: `hooks` must be a list of keras_custom.Hook instances. Received: hooks=42",
        ),
        (
            [hooks.WeightPenalty(l2=1.0, include="no_such_layer")],
            ValueError,
            "WeightPenalty: the `include` pattern 'no_such_layer' matches no variable of the model. Received: include='no_such_layer'. Variable paths: ",
        ),
        (
            [hooks.WeightPenalty(l2=1.0, exclude="nope")],
            ValueError,
            "WeightPenalty: the `exclude` pattern 'nope' matches no variable",
        ),
        (
            [hooks.WeightPenalty(l2=1.0, exclude="kernel")],
            ValueError,
            "WeightPenalty: no variable to penalize",
        ),
    ],
)
def test_failed_compile_leaves_the_model_as_it_was(hook_list, error, message):
    model = mlp()
    good = [hooks.LogGradNorm()]
    model.compile("adam", "mse", hooks=good)
    before = state_of(model)
    with pytest.raises(error, match=re.escape(message)):
        model.compile("sgd", "mae", hooks=hook_list)
    after = state_of(model)
    assert after[0] == before[0] and after[1] == before[1]
    assert after[2] is before[2] and after[3] == before[3]
    model.fit(np.ones((4, 6)), np.ones((4, 1)), verbose=0)  # still trains as before


def test_failed_compile_on_a_keras_argument_is_undone():
    model = mlp()
    model.compile("adam", "mse", hooks=[hooks.LogGradNorm()])
    optimizer = model.optimizer
    with pytest.raises(ValueError, match="no_such_optimizer"):
        model.compile("no_such_optimizer", loss="mae", hooks=[hooks.ClipByValue(1.0)])
    assert model.optimizer is optimizer and model.loss == "mse"
    assert [type(h).__name__ for h in model.hooks] == ["LogGradNorm"]


def test_pattern_error_on_unbuilt_model_comes_at_first_build():
    from keras_custom import Sequential

    model = Sequential([keras.layers.Dense(2, name="d")])  # no input shape: not built
    model.compile("sgd", "mse", hooks=[hooks.WeightPenalty(l2=1.0, include="missing")])
    with pytest.raises(
        ValueError, match="WeightPenalty: the `include` pattern 'missing'"
    ):
        model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)


def test_a_hook_belongs_to_one_model():
    hook = hooks.LogGradNorm()
    first = mlp()  # kept alive: a hook holds its model weakly
    first.compile("sgd", "mse", hooks=[hook])
    with pytest.raises(ValueError, match="LogGradNorm is already attached to the model"):
        mlp().compile("sgd", "mse", hooks=[hook])


def test_the_same_hook_twice():
    hook = hooks.LogGradNorm()
    with pytest.raises(
        ValueError, match=re.escape("compile: `hooks[1]` (LogGradNorm) appears twice")
    ):
        mlp().compile("sgd", "mse", hooks=[hook, hook])


def test_hook_returning_wrong_number_of_gradients():
    import keras_custom as kc

    class Broken(kc.Hook):
        def process_gradients(self, grads, variables, step):
            return grads[:1]

    model = mlp()
    model.compile("sgd", "mse", hooks=[Broken()])
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Broken.process_gradients must return one gradient per variable (4). Received: 1"
        ),
    ):
        model.fit(np.ones((4, 6)), np.ones((4, 1)), verbose=0)
