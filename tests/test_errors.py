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
            lambda: hooks.WeightPenalty(l2=1e39),
            "WeightPenalty: `l2` must fit in float32 (at most 3.40282e+38)",
        ),
        (
            lambda: hooks.GradientNoise(eta=1e39),
            "GradientNoise: `eta` must fit in float32",
        ),
        (
            lambda: hooks.SharpnessAware(1e39),
            "SharpnessAware: `rho` must fit in float32",
        ),
        (
            lambda: hooks.LogGradNorm(start_step=2**64),
            "LogGradNorm: `start_step` must be at most 9223372036854775807",
        ),
        (
            lambda: hooks.ClipByValue(1.0, stop_step=2**64),
            "ClipByValue: `stop_step` must be at most 9223372036854775807",
        ),
        (
            lambda: hooks.Freeze("x", until_step=2**64),
            "Freeze: `until_step` must be at most 9223372036854775807",
        ),
        (
            lambda: hooks.SkipNonFinite(max_consecutive=2**64),
            "SkipNonFinite: `max_consecutive` must be at most 2147483647",
        ),
        (
            lambda: hooks.GradientNoise(seed=2**64),
            "GradientNoise: `seed` must be at most 4294967295",
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


@pytest.mark.parametrize(
    "make, shown",
    [
        (lambda: hooks.LogGradNorm(name=3), "name=3 of type int"),
        (lambda: hooks.LogLearningRate(name=["lr"]), "name=['lr'] of type list"),
        (lambda: hooks.ClipByValue(1.0, name=5), "name=5 of type int"),
        (lambda: hooks.LogUpdateRatio(name=""), "name=''"),
    ],
)
def test_a_bad_name_is_refused_at_construction(make, shown):
    with pytest.raises(
        TypeError,
        match=re.escape(f"`name` must be a non-empty string. Received: {shown}"),
    ):
        make()


def test_a_zero_penalty_is_a_valid_no_op(data):
    x, y = data
    model = mlp()
    model.compile("sgd", "mse", hooks=[hooks.WeightPenalty()])
    history = model.fit(x, y, epochs=1, verbose=0).history
    assert history["weight_penalty"] == [0.0]


def test_raising_a_zero_strength_from_a_callback_takes_effect(data):
    """`l2` starts at 0 (left out of the compiled step); a callback raises it at
    the second epoch: the step is traced again, with the term."""
    x, y = data
    penalty = hooks.WeightPenalty(l2=0.0)

    class Raise(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                penalty.l2 = 0.5

    model = mlp()
    model.compile("sgd", "mse", hooks=[penalty])
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=[Raise()]).history
    assert history["weight_penalty"][0] == 0.0
    assert history["weight_penalty"][1] > 0.0
    kernels = [model.get_layer(n).kernel for n in ("hidden", "out")]
    expected = 0.5 * sum(
        float(np.sum(np.square(keras.ops.convert_to_numpy(k)))) for k in kernels
    )
    evaluated = model.evaluate(x, y, verbose=0, return_dict=True)
    np.testing.assert_allclose(float(evaluated["weight_penalty"]), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "unordered", [set, frozenset, lambda hs: {h.name: h for h in hs}]
)
def test_unordered_hooks_are_refused(unordered):
    model = mlp()
    with pytest.raises(TypeError, match="hooks run in list order"):
        model.compile("sgd", "mse", hooks=unordered([hooks.LogGradNorm()]))
    assert model.hooks == []


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
    with pytest.raises(
        ValueError,
        match=re.escape("`hooks[0]` (LogGradNorm(name='grad_norm')) is already attached"),
    ):
        mlp().compile("sgd", "mse", hooks=[hook])


def test_the_same_hook_twice():
    hook = hooks.LogGradNorm()
    with pytest.raises(
        ValueError,
        match=re.escape(
            "compile: `hooks[1]` (LogGradNorm(name='grad_norm')) is the same object "
            "as `hooks[0]`"
        ),
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
