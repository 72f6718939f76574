"""Staging: start_step/stop_step windows, no retracing, Freeze, strengths changed
from a callback."""

import re

import keras
import numpy as np
import pytest
from conftest import mlp
from conftest import only_backends
from conftest import requires_keras

import keras_custom as kc
from keras_custom import hooks
from keras_custom.hooks.staging import optimizer_slots

npv = keras.ops.convert_to_numpy


class StepProbe(kc.Hook):
    """Logs the step it runs at (sum) and a count of active steps (sum)."""

    def build(self, model):
        self.declare_log(f"{self.name}_steps", reduction="sum")
        self.declare_log(f"{self.name}_count", reduction="sum")

    def process_gradients(self, grads, variables, step):
        self.log(f"{self.name}_steps", keras.ops.cast(step, "float32"), reduction="sum")
        self.log(f"{self.name}_count", 1.0, reduction="sum")
        return grads


def tiny_data(n=32):
    rng = np.random.default_rng(1)
    return (
        rng.normal(size=(n, 6)).astype("float32"),
        rng.normal(size=(n, 1)).astype("float32"),
    )


def test_window_is_start_inclusive_stop_exclusive():
    x, y = tiny_data()  # 4 steps per epoch at batch 8: steps 0..11 in 3 epochs
    model = mlp()
    model.compile(
        "sgd", "mse", hooks=[StepProbe(name="all"), StepProbe(start_step=2, stop_step=5)]
    )
    history = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0).history
    assert history["step_probe_steps"] == [2.0 + 3.0, 4.0, 0.0]
    assert history["step_probe_count"] == [2.0, 1.0, 0.0]
    assert history["all_count"] == [4.0, 4.0, 4.0]
    assert history["all_steps"] == [6.0, 22.0, 38.0]


def test_gradient_hook_acts_only_inside_its_window():
    x, y = tiny_data(8)
    model = mlp()
    model.compile(
        keras.optimizers.SGD(0.1),
        "mse",
        hooks=[hooks.ClipByValue(1e-7, start_step=2, stop_step=4)],
    )
    deltas = []
    for _ in range(6):
        before = model.get_weights()
        model.train_on_batch(x, y)
        deltas.append(
            max(np.abs(a - b).max() for a, b in zip(model.get_weights(), before))
        )
    for step, delta in enumerate(deltas):
        if 2 <= step < 4:  # lr * limit = 1e-8, within float32 rounding of w
            assert delta < 1e-7, (step, delta)
        else:
            assert delta > 1e-4, (step, delta)


def test_loss_term_and_its_log_count_only_inside_the_window():
    x, y = tiny_data(8)
    model = mlp()
    model.compile(
        "sgd", "mse", hooks=[hooks.WeightPenalty(l2=10.0, start_step=1, stop_step=2)]
    )
    plain = mlp()
    plain.compile("sgd", "mse")
    losses = []
    for _ in range(3):
        # Per-call logs (Keras before 3.15 accumulates metrics across calls).
        model.reset_metrics()
        plain.reset_metrics()
        logs = model.train_on_batch(x, y, return_dict=True)
        plain_logs = plain.train_on_batch(x, y, return_dict=True)
        losses.append((logs["loss"], plain_logs["loss"], logs["weight_penalty"]))
    assert losses[0][0] == pytest.approx(losses[0][1], rel=1e-6)
    assert losses[0][2] == 0.0  # nothing counted outside the window
    assert losses[1][2] > 0.0 and losses[1][0] == pytest.approx(
        losses[1][1] + losses[1][2], rel=1e-5
    )


# ----------------------------------------------------------------- traces
def counting(base):
    class Counting(base):
        traces = 0

        def train_step(self, *args):  # (data), or (state, data) on JAX
            type(self).traces += 1  # Python runs only while tracing
            return super().train_step(*args)

    return Counting


def traces_of(
    cls, epochs, hooks_=None, callbacks=None, jit_compile=False, optimizer="adam"
):
    x, y = tiny_data()
    keras.utils.set_random_seed(0)
    cls = counting(cls)
    model = cls(
        [
            keras.Input((6,)),
            keras.layers.Dense(4, name="a"),
            keras.layers.Dense(1, name="b"),
        ]
    )
    kwargs = {"hooks": hooks_} if hooks_ is not None else {}
    # On JAX only `jit_compile=True` traces (False runs the step in Python).
    jit_compile = jit_compile or keras.backend.backend() == "jax"
    model.compile(optimizer, "mse", jit_compile=jit_compile, **kwargs)
    model.fit(
        x, y, batch_size=8, epochs=epochs, verbose=0, callbacks=callbacks, shuffle=False
    )
    return cls.traces, model


def windowed_hooks():
    return [
        hooks.Freeze("a/", until_step=3),
        hooks.WeightPenalty(l2=1e-3, start_step=2, stop_step=6),
        hooks.ClipByGlobalNorm(0.5, start_step=5),
        hooks.SkipNonFinite(stop_step=7),
        hooks.LogGradNorm(start_step=1, stop_step=9),
    ]


@only_backends("tensorflow", "jax")  # torch runs the step in Python each time
def test_windows_never_trace_again():
    plain, _ = traces_of(keras.Sequential, epochs=3)
    one, _ = traces_of(kc.Sequential, epochs=1, hooks_=windowed_hooks())
    three, _ = traces_of(kc.Sequential, epochs=3, hooks_=windowed_hooks())
    assert one == three <= plain


class SetLimit(keras.callbacks.Callback):
    def __init__(self, hook, limits):
        super().__init__()
        self.hook, self.limits = hook, limits

    def on_epoch_begin(self, epoch, logs=None):
        self.hook.limit = self.limits[epoch]


@only_backends("tensorflow", "jax")  # torch runs the step in Python each time
def test_strength_changed_from_a_callback_takes_effect_without_retracing():
    plain, _ = traces_of(keras.Sequential, epochs=3, optimizer=keras.optimizers.SGD(0.1))
    hook = hooks.ClipByValue(1.0)
    seen = []

    def record(epoch, logs):
        seen.append([npv(w).copy() for w in model.trainable_variables])

    tracker = keras.callbacks.LambdaCallback(on_epoch_end=record)
    first = [None]

    def remember(epoch, logs):
        if epoch == 0:
            first[0] = [npv(w).copy() for w in model.trainable_variables]

    start = keras.callbacks.LambdaCallback(on_epoch_begin=remember)
    # epochs 0 and 2: loose limit; epoch 1: tiny limit
    callbacks = [start, SetLimit(hook, [1.0, 1e-9, 1.0]), tracker]
    model = None
    cls = counting(kc.Sequential)
    keras.utils.set_random_seed(0)
    model = cls([keras.Input((6,)), keras.layers.Dense(4), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.1), "mse", hooks=[hook])
    x, y = tiny_data()
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=callbacks, shuffle=False)
    assert cls.traces == plain
    assert hook.limit == 1.0 and float(npv(hook._strength_variables["limit"])) == 1.0
    step = [
        max(np.abs(a - b).max() for a, b in zip(after, before))
        for before, after in zip([first[0]] + seen[:-1], seen)
    ]
    assert step[0] > 1e-3 and step[2] > 1e-3
    assert step[1] <= 4 * 0.1 * 1e-9 * 1.001  # four steps of at most lr * limit


# ----------------------------------------------------------------- Freeze
def make_optimizer(name):
    return {
        "sgd_momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
        "adam": lambda: keras.optimizers.Adam(0.01),
        "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.5),
        "lso_adam": lambda: keras.optimizers.LossScaleOptimizer(
            keras.optimizers.Adam(0.01)
        ),
    }[name]()


@pytest.mark.parametrize("opt", ["sgd_momentum", "adam", "adamw", "lso_adam"])
def test_freeze_keeps_weights_and_slots_bit_identical(opt):
    """Frozen at steps 2 and 3 after training at 0 and 1: momentum is non-zero,
    so zeroing the gradient alone would still move the weights."""
    x, y = tiny_data(8)
    model = mlp()
    hook = hooks.Freeze("hidden", until_step=4, start_step=2)
    model.compile(make_optimizer(opt), "mse", hooks=[hook])
    hidden = model.get_layer("hidden")

    def state():
        slots = [s for v in hidden.weights for s in optimizer_slots(model.optimizer, v)]
        return [npv(v).copy() for v in hidden.weights + slots]

    for _ in range(2):
        model.train_on_batch(x, y)
    frozen_at = state()
    assert any(np.any(s != 0) for s in frozen_at[2:])  # momentum is non-zero
    for step in (2, 3):
        out_before = npv(model.get_layer("out").kernel).copy()
        model.train_on_batch(x, y)
        for a, b in zip(state(), frozen_at):
            np.testing.assert_array_equal(a, b, err_msg=f"step {step}")
        assert not np.array_equal(npv(model.get_layer("out").kernel), out_before)
    for _ in range(2):
        model.train_on_batch(x, y)  # steps 4, 5: thawed
    assert not np.array_equal(npv(hidden.kernel), frozen_at[0])


@pytest.mark.parametrize("opt", ["adam", "adamw"])
def test_other_weights_train_as_if_frozen_ones_were_not_trainable(opt):
    x, y = tiny_data(16)
    model = mlp()
    model.compile(
        make_optimizer(opt), "mse", hooks=[hooks.Freeze("hidden", until_step=3)]
    )
    ref = mlp(keras.Model)
    ref.get_layer("hidden").trainable = False
    ref.compile(make_optimizer(opt), "mse")
    for _ in range(3):
        model.train_on_batch(x, y)
        ref.train_on_batch(x, y)
    for a, b in zip(model.get_layer("out").weights, ref.get_layer("out").weights):
        np.testing.assert_allclose(npv(a), npv(b), rtol=1e-6, atol=1e-7)
    for a, b in zip(model.get_layer("hidden").weights, ref.get_layer("hidden").weights):
        np.testing.assert_array_equal(npv(a), npv(b))


def test_freeze_zeroes_gradients_for_later_hooks():
    x, y = tiny_data(8)
    model = mlp()
    model.compile(
        "sgd",
        "mse",
        hooks=[
            hooks.LogGradNorm(per_layer=True, name="raw"),
            hooks.Freeze("hidden", until_step=1),
            hooks.LogGradNorm(per_layer=True, name="seen"),
        ],
    )
    first = model.train_on_batch(x, y, return_dict=True)
    model.reset_metrics()  # per-call logs (Keras before 3.15 accumulates them)
    second = model.train_on_batch(x, y, return_dict=True)
    assert first["raw/hidden"] > 0 and first["seen/hidden"] == 0.0
    assert first["seen/out"] == first["raw/out"]
    assert second["seen/hidden"] == second["raw/hidden"] > 0


def test_freeze_forever_and_under_fit_with_jit():
    x, y = tiny_data()
    model = mlp()
    model.compile(
        "adamw", "mse", hooks=[hooks.Freeze(["hidden/kernel"])], jit_compile=True
    )
    kernel = npv(model.get_layer("hidden").kernel).copy()
    bias = npv(model.get_layer("hidden").bias).copy()
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    np.testing.assert_array_equal(npv(model.get_layer("hidden").kernel), kernel)
    assert not np.array_equal(npv(model.get_layer("hidden").bias), bias)


@requires_keras(3, 15, "keras.optimizers.MultiOptimizer")
def test_optimizer_slots_found_structurally():
    model = mlp()
    for name, count in [("adam", 2), ("sgd_momentum", 1), ("lso_adam", 2)]:
        opt = make_optimizer(name)
        opt.build(model.trainable_variables)
        for v in model.trainable_variables:
            slots = optimizer_slots(opt, v)
            assert len(slots) == count, name
            assert all(tuple(s.shape) == tuple(v.shape) for s in slots)
    sgd = keras.optimizers.SGD()
    sgd.build(model.trainable_variables)
    assert optimizer_slots(sgd, model.trainable_variables[0]) == []
    multi = keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(
            keras.optimizers.SGD(momentum=0.9), {"hidden/.*": keras.optimizers.Adam()}
        )
    )
    multi.build(model.trainable_variables)
    hidden_kernel, out_kernel = model.trainable_variables[0], model.trainable_variables[2]
    assert len(optimizer_slots(multi, hidden_kernel)) == 2
    assert len(optimizer_slots(multi, out_kernel)) == 1


def test_freeze_save_load_round_trip(tmp_path):
    x, y = tiny_data()
    model = mlp()
    model.compile("adam", "mse", hooks=[hooks.Freeze("hidden", until_step=6)])
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)  # steps 0-3
    model.save(tmp_path / "freeze.keras")
    restored = keras.models.load_model(tmp_path / "freeze.keras")
    (hook,) = restored.hooks
    assert isinstance(hook, hooks.Freeze)
    assert hook.get_config() == model.hooks[0].get_config()
    assert [v.path for v in hook.frozen_variables] == ["hidden/kernel", "hidden/bias"]
    frozen = npv(restored.get_layer("hidden").kernel).copy()
    restored.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)  # steps 4-7
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(npv(restored.get_layer("hidden").kernel), frozen)


@pytest.mark.parametrize(
    "kwargs, error, text",
    [
        ({"include": None}, ValueError, "Freeze: `include` must be a regular expression"),
        ({"include": []}, ValueError, "Freeze: `include`"),
        ({"include": 5}, TypeError, "Freeze: `include` must contain strings"),
        (
            {"include": "x", "until_step": 0},
            ValueError,
            "Freeze: `until_step` must be None or an integer >= 1. Received: until_step=0",
        ),
        ({"include": "x", "until_step": 2.5}, ValueError, "until_step=2.5"),
        (
            {"include": "x", "start_step": 4, "stop_step": 2},
            ValueError,
            "Freeze: `stop_step` must be greater than `start_step`",
        ),
    ],
)
def test_freeze_bad_arguments(kwargs, error, text):
    with pytest.raises(error, match=re.escape(text)):
        hooks.Freeze(**kwargs)


def test_freeze_pattern_matching_nothing_fails_compile_and_keeps_model():
    model = mlp()
    model.compile("sgd", "mse", hooks=[hooks.LogGradNorm()])
    with pytest.raises(ValueError, match="Freeze: the `include` pattern 'encoder'"):
        model.compile("sgd", "mse", hooks=[hooks.Freeze("encoder")])
    assert [type(h).__name__ for h in model.hooks] == ["LogGradNorm"]


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (hooks.ClipByValue, {"limit": 1.0}),
        (hooks.SkipNonFinite, {}),
        (hooks.GradientNoise, {}),
        (hooks.SharpnessAware, {}),
        (hooks.LogUpdateRatio, {}),
        (hooks.AdaptiveClip, {}),
    ],
)
@pytest.mark.parametrize(
    "window, text",
    [
        (
            {"start_step": 3, "stop_step": 3},
            "`stop_step` must be greater than `start_step`",
        ),
        (
            {"start_step": 5, "stop_step": 1},
            "`stop_step` must be greater than `start_step`. Received: start_step=5, stop_step=1",
        ),
        (
            {"start_step": -1},
            "`start_step` must be an integer >= 0. Received: start_step=-1",
        ),
        (
            {"stop_step": 1.5},
            "`stop_step` must be an integer >= 0. Received: stop_step=1.5",
        ),
    ],
)
def test_every_hook_refuses_a_bad_window(cls, kwargs, window, text):
    with pytest.raises(ValueError, match=re.escape(f"{cls.__name__}: {text}")):
        cls(**kwargs, **window)
