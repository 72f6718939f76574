"""`.keras` round trips: model class, hooks (config and state), optimizer, compile."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import assert_weights_equal
from conftest import mlp
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import keras_custom as kc
from keras_custom import hooks


@keras.saving.register_keras_serializable(package="tests")
def scaled_mse(y_true, y_pred):
    return 2.0 * keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1)


@keras.saving.register_keras_serializable(package="tests")
class HuberLike(keras.losses.Loss):
    def __init__(self, delta=1.0, **kwargs):
        super().__init__(**kwargs)
        self.delta = delta

    def call(self, y_true, y_pred):
        err = keras.ops.abs(y_true - y_pred)
        return keras.ops.mean(keras.ops.minimum(err, self.delta) * err, axis=-1)

    def get_config(self):
        return {**super().get_config(), "delta": self.delta}


def hook_stack():
    return [
        hooks.WeightPenalty(l2=1e-3, exclude="out"),
        hooks.LogGradNorm(name="grad_norm_raw"),
        hooks.ClipByGlobalNorm(keras.optimizers.schedules.ExponentialDecay(1.0, 10, 0.5)),
        hooks.ClipByValue(0.5, start_step=1),
        hooks.LogGradNorm(per_layer=True),
        hooks.LogWeightNorm(),
        hooks.LogLearningRate(),
    ]


def test_model_hooks_optimizer_and_compile_survive(data, tmp_path):
    x, y = data
    model = mlp()
    model.compile(
        keras.optimizers.Adam(0.01), HuberLike(0.5), metrics=["mae"], hooks=hook_stack()
    )
    model.fit(x, y, epochs=1, verbose=0)
    model.hooks[3].limit = 0.25  # changed after compile: the saved value is the new one
    path = tmp_path / "m.keras"
    model.save(path)
    restored = keras.models.load_model(path)  # safe_mode=True, no custom_objects
    assert type(restored) is type(model)
    assert [h.get_config() for h in restored.hooks] == [
        h.get_config() for h in model.hooks
    ]
    assert restored.hooks[3].limit == 0.25
    assert isinstance(restored.loss, HuberLike) and restored.loss.delta == 0.5
    for a, b in zip(model.optimizer.variables, restored.optimizer.variables):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        )
    for ha, hb in zip(model.hooks, restored.hooks):
        for a, b in zip(ha.variables, hb.variables):
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
            )
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), restored.predict(x, verbose=0)
    )


@pytest.mark.parametrize("kind", ["functional", "sequential", "subclass"])
def test_resume_equals_uninterrupted(data, tmp_path, kind):
    """k epochs + save/load + k epochs == 2k epochs."""
    x, y = data

    def make():
        keras.utils.set_random_seed(3)
        if kind == "functional":
            model = mlp()
        elif kind == "sequential":
            model = kc.Sequential(
                [
                    keras.Input((6,)),
                    keras.layers.Dense(4, name="d1"),
                    keras.layers.Dense(1, name="out"),
                ]
            )
        else:
            model = Tiny()
            model(x[:1])
        model.compile(keras.optimizers.Adam(0.01), scaled_mse, hooks=hook_stack())
        return model

    straight = make()
    straight.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    first = make()
    first.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    first.save(tmp_path / "half.keras")
    resumed = keras.models.load_model(tmp_path / "half.keras")
    history = resumed.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert_weights_equal(straight, resumed, rtol=1e-6, atol=1e-7)
    assert int(resumed.optimizer.iterations) == int(straight.optimizer.iterations) == 8
    assert "grad_norm_raw" in history.history


@keras.saving.register_keras_serializable(package="tests")
class Tiny(kc.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.d1 = keras.layers.Dense(4, name="d1")
        self.out = keras.layers.Dense(1, name="out")

    def call(self, x):
        return self.out(self.d1(x))


def test_load_in_a_fresh_process(data, tmp_path):
    x, y = data
    model = mlp()
    model.compile("adam", scaled_mse, hooks=hook_stack())
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "pred.npy", model.predict(x, verbose=0))
    script = textwrap.dedent(
        """
        import sys, numpy as np, keras
        import keras_custom
        from keras.saving import register_keras_serializable

        @register_keras_serializable(package="tests")
        def scaled_mse(y_true, y_pred):
            return 2.0 * keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1)

        d = sys.argv[1]
        m = keras.models.load_model(d + "/m.keras")
        assert isinstance(m, keras_custom.Model), type(m)
        assert [type(h).__name__ for h in m.hooks][:3] == [
            "WeightPenalty", "LogGradNorm", "ClipByGlobalNorm"], m.hooks
        np.testing.assert_array_equal(m.predict(np.load(d + "/x.npy"), verbose=0),
                                      np.load(d + "/pred.npy"))
        print("OK", int(m.optimizer.iterations))
        """
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK 2")


strengths = st.floats(1e-4, 10.0, allow_nan=False)
windows = st.tuples(st.integers(0, 5), st.one_of(st.none(), st.integers(6, 20)))


@st.composite
def hook_configs(draw):
    start, stop = draw(windows)
    common = {"start_step": start, "stop_step": stop}
    choice = draw(
        st.sampled_from(["penalty", "value", "norm", "global", "grad", "w", "lr"])
    )
    if choice == "penalty":
        return hooks.WeightPenalty(
            l1=draw(strengths),
            l2=draw(strengths),
            include=draw(st.one_of(st.none(), st.just(["kernel"]))),
            exclude=draw(st.one_of(st.none(), st.just(["out"]))),
            **common,
        )
    if choice == "value":
        return hooks.ClipByValue(draw(strengths), **common)
    if choice == "norm":
        return hooks.ClipByNorm(draw(strengths), **common)
    if choice == "global":
        return hooks.ClipByGlobalNorm(draw(strengths), **common)
    if choice == "grad":
        return hooks.LogGradNorm(
            per_layer=draw(st.booleans()),
            name=draw(st.sampled_from(["grad_norm", "g2"])),
            **common,
        )
    if choice == "w":
        return hooks.LogWeightNorm(**common)
    return hooks.LogLearningRate(**common)


@settings(max_examples=80, deadline=None)
@given(hook_configs())
def test_generated_hook_configs_round_trip(hook):
    config = hook.get_config()
    clone = type(hook).from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(hook)
    again = keras.saving.deserialize_keras_object(serialized)
    assert type(again) is type(hook) and again.get_config() == config


def test_schedule_strength_round_trips():
    schedule = keras.optimizers.schedules.ExponentialDecay(1.0, 10, 0.5)
    hook = hooks.ClipByNorm(schedule)
    again = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(hook)
    )
    assert isinstance(again.max_norm, keras.optimizers.schedules.ExponentialDecay)
    assert again.max_norm.get_config() == schedule.get_config()


def test_hook_state_is_saved(data, tmp_path):
    """A hook's variables are written to the file and read back."""
    x, y = data

    class Counter(kc.Hook):
        def build(self, model):
            self.count = self.add_variable(dtype="int32")

        def after_update(self, model, step):
            self.count.assign_add(1)

    keras.saving.register_keras_serializable(package="tests")(Counter)
    model = mlp()
    model.compile("sgd", "mse", hooks=[Counter()])
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert int(model.hooks[0].count) == 8
    model.save(tmp_path / "c.keras")
    restored = keras.models.load_model(tmp_path / "c.keras")
    assert int(restored.hooks[0].count) == 8
    restored.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert int(restored.hooks[0].count) == 12
