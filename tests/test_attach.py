"""`kc.attach(model, hooks)`: hooks on a Keras model that was not built from kc.Model.

Three kinds of model a user already has: a Functional (`keras.Model(inputs,
outputs)`), a `keras.Sequential`, and a user's own `keras.Model` subclass (extra
`__init__` arguments, `get_config`). Each attached model must train exactly as the
same model built from `kc.Model` / `kc.Sequential` (its "twin"), keep its class,
and save files that name its class and load without keras_custom.
KerasHub tasks: `test_attach_hub.py`; `keras.applications`: `test_attach_applications.py`.
"""

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import only_backends

import keras_custom as kc
from keras_custom import hooks
from keras_custom.backend import Trainer
from keras_custom.step.saving import public_optimizers

KINDS = ["functional", "sequential", "subclass"]


def _user_class(base, name):
    class Net(base):
        """A user's own model: extra `__init__` arguments and `get_config`."""

        def __init__(self, units=8, scale=0.5, **kwargs):
            super().__init__(**kwargs)
            self.units = units
            self.scale = scale
            self.hidden = keras.layers.Dense(units, activation="tanh", name="hidden")
            self.out = keras.layers.Dense(1, name="out")

        def call(self, x):
            return self.out(self.hidden(x)) * self.scale

        def get_config(self):
            return {**super().get_config(), "units": self.units, "scale": self.scale}

    Net.__name__ = Net.__qualname__ = name
    return Net


# The user's class, registered as a user registers it (for `load_model` without
# custom_objects), and its twin written on kc.Model.
UserNet = keras.saving.register_keras_serializable(package="tests_attach")(
    _user_class(keras.Model, "UserNet")
)
KcUserNet = _user_class(kc.Model, "KcUserNet")


def build(kind, twin=False, x=None):
    """A model of `kind`, built (weights made) when `x` is given.

    `twin=True`: the same model from keras_custom's classes.
    """
    keras.utils.set_random_seed(0)
    if kind == "functional":
        inputs = keras.Input((6,), name="x")
        h = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
        outputs = keras.layers.Dense(1, name="out")(h)
        model = (kc.Model if twin else keras.Model)(inputs, outputs, name="net")
    elif kind == "sequential":
        layers = [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ]
        model = (kc.Sequential if twin else keras.Sequential)(layers, name="net")
    else:
        model = (KcUserNet if twin else UserNet)(units=8, scale=0.5, name="net")
    if x is not None:
        model(x[:2])
    return model


def stack():
    """Hooks of every stage, with bounds that bite on this problem."""
    return [
        hooks.WeightPenalty(l2=1e-3),
        hooks.LogGradNorm(name="grad_norm_raw"),
        hooks.ClipByGlobalNorm(0.05),
        hooks.SkipNonFinite(),
        hooks.GradientNoise(eta=1e-4, seed=3),
        hooks.LogGradNorm(),
        hooks.LogWeightNorm(),
    ]


def nan_data(data):
    """The shared data with one batch of 8 (the third) that is NaN."""
    x, y = data
    x = x.copy()
    x[16:24] = np.nan
    return x, y


def state_of(model):
    return [np.asarray(v) for h in getattr(model, "hooks", ()) for v in h.variables]


def assert_same_training(a, b, ha, hb):
    """Bitwise the same weights, optimizer state, hook state and logs."""
    for u, v in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(u, v)
    for u, v in zip(a.optimizer.variables, b.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    for u, v in zip(state_of(a), state_of(b), strict=True):
        np.testing.assert_array_equal(u, v)
    assert ha.keys() == hb.keys()
    for key in ha:
        np.testing.assert_array_equal(ha[key], hb[key], err_msg=key)


# --------------------------------------------------------------------- the model
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("when", ["fresh", "trained"])
def test_attach_returns_the_model_with_its_own_class(data, kind, when):
    x, y = data
    model = build(kind, x=x if when == "trained" else None)
    own = type(model)
    if when == "trained":
        model.compile("sgd", "mse")
        model.fit(x, y, epochs=1, verbose=0)
    weights = [np.array(w) for w in model.get_weights()]
    clip, log = hooks.ClipByGlobalNorm(1.0), hooks.LogGradNorm()
    assert kc.attach(model, [clip, log]) is model
    assert isinstance(model, own) and type(model).__name__ == own.__name__
    assert isinstance(model, Trainer) and type(model) is not own
    assert type(model).__name__ == own.__name__
    assert model.hooks == [clip, log]
    assert model.name == "net"
    if kind == "subclass":
        assert model.built == (when == "trained")
    for w, v in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(w, v)  # nothing else changed
    # The class of every other instance is untouched.
    assert not isinstance(build(kind), Trainer)
    if kind == "subclass":
        assert (model.units, model.scale) == (8, 0.5)
        assert model.get_config()["units"] == 8
    model.compile("sgd", "mse")
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert history["grad_norm"][0] > 0


@pytest.mark.parametrize(
    "kind, order",
    [
        ("functional", "compile_then_attach"),
        ("sequential", "attach_then_compile"),
        ("subclass", "compile_then_attach"),
    ],
)
def test_attached_equals_kc_model(data, kind, order):
    """Attached == the same model written with kc.Model / kc.Sequential, bitwise:
    weights, optimizer and hook state, every log (a NaN batch skipped included)."""
    x, y = nan_data(data)
    twin = build(kind, twin=True, x=x)
    twin.compile(keras.optimizers.Adam(0.01), "mse", metrics=["mae"], hooks=stack())
    model = build(kind, x=x)
    model.set_weights(twin.get_weights())
    if order == "compile_then_attach":
        model.compile(keras.optimizers.Adam(0.01), "mse", metrics=["mae"])
        kc.attach(model, stack())
    else:
        kc.attach(model, stack())
        model.compile(keras.optimizers.Adam(0.01), "mse", metrics=["mae"])
    runs = []
    for m in (twin, model):
        history = m.fit(
            x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, validation_split=0.25
        ).history
        runs.append(history)
    assert runs[1]["skipped_steps"] == [1.0, 1.0]
    assert {"val_loss", "val_mae", "val_weight_penalty"} <= set(runs[1])
    assert_same_training(twin, model, *runs)
    np.testing.assert_array_equal(
        model.evaluate(x[:16], y[:16], verbose=0),
        twin.evaluate(x[:16], y[:16], verbose=0),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_without_hooks_training_is_plain_keras(data, kind):
    """Hooks attached then removed (`hooks=[]`), and an empty list attached to a
    fresh model: bitwise the training of the same plain Keras model."""
    x, y = data

    def run(model):
        model.compile(keras.optimizers.Adam(0.01), "mse", metrics=["mae"])
        keras.utils.set_random_seed(1)
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0).history
        return model, history

    plain, plain_logs = run(build(kind, x=x))
    removed = build(kind, x=x)
    kc.attach(removed, stack())
    kc.attach(removed, [])
    assert removed.hooks == []
    empty = kc.attach(build(kind, x=x), hooks=[])
    for model in (removed, empty):
        model, logs = run(model)
        assert isinstance(model, Trainer)
        assert logs == plain_logs
        for u, v in zip(plain.get_weights(), model.get_weights(), strict=True):
            np.testing.assert_array_equal(u, v)


def test_unbuilt_subclass_equals_kc_model_and_keras(data):
    """Attached before its first call: the model is built by `fit` (on TensorFlow
    inside the first trace of the step), its hooks with it."""
    x, y = nan_data(data)

    def run(model, kwargs):
        model.compile(keras.optimizers.Adam(0.01), "mse", **kwargs)
        return model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0).history

    twin = build("subclass", twin=True)
    twin_logs = run(twin, {"hooks": stack()})
    model = kc.attach(build("subclass"), stack())
    assert not model.built
    logs = run(model, {})
    assert logs["skipped_steps"] == [1.0] and logs["weight_penalty"][0] > 0
    assert_same_training(twin, model, twin_logs, logs)

    x, y = data
    plain, empty = build("subclass"), kc.attach(build("subclass"), [])
    plain_logs, empty_logs = run(plain, {}), run(empty, {})
    assert_same_training(plain, empty, plain_logs, empty_logs)


def test_attach_drops_a_step_compiled_before(data):
    """`fit`/`evaluate` before `attach` compiled Keras's step; the next calls
    must trace the hooked one (and again after the hooks are removed)."""
    x, y = data
    model = build("functional", x=x)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    plain_loss = model.evaluate(x, y, verbose=0)
    assert model.train_function is not None and model.test_function is not None

    kc.attach(model, [hooks.WeightPenalty(l2=0.5), hooks.LogGradNorm()])
    penalty = 0.5 * sum(
        float(np.sum(np.square(np.asarray(v))))
        for v in model.trainable_variables
        if v.path.endswith("kernel")
    )
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    np.testing.assert_allclose(logs["loss"], plain_loss + penalty, rtol=1e-5)
    np.testing.assert_allclose(logs["weight_penalty"], penalty, rtol=1e-5)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert history["grad_norm"][0] > 0 and history["weight_penalty"][0] > 0

    kc.attach(model, [])
    loss = model.evaluate(x, y, verbose=0)
    assert "grad_norm" not in model.fit(x, y, batch_size=16, verbose=0).history
    assert loss < plain_loss + penalty / 2  # the penalty is gone from the loss


def test_compile_keeps_the_attached_hooks(data):
    x, y = data
    model = build("sequential", x=x)
    clip = hooks.ClipByGlobalNorm(1.0)
    kc.attach(model, [clip, hooks.LogGradNorm()])
    model.compile("sgd", "mse")
    model.fit(x, y, batch_size=16, verbose=0)
    clip.max_norm = 0.25  # state, in a variable
    model.compile(keras.optimizers.Adam(0.01), "mse")  # no `hooks=`: kept
    assert model.hooks[0] is clip and float(np.asarray(clip.variables[0])) == 0.25
    assert "grad_norm" in model.fit(x, y, batch_size=16, verbose=0).history
    other = hooks.LogWeightNorm()
    model.compile("sgd", "mse", hooks=[other])  # `hooks=` replaces them
    assert model.hooks == [other]
    history = model.fit(x, y, batch_size=16, verbose=0).history
    assert "weight_norm" in history and "grad_norm" not in history
    model.compile("sgd", "mse", hooks=[])
    assert model.hooks == []


def test_attach_to_a_kc_model_replaces_its_hooks(data):
    x, y = data
    model = build("functional", twin=True, x=x)
    model.compile("sgd", "mse", hooks=[hooks.LogWeightNorm()])
    model.fit(x, y, batch_size=16, verbose=0)
    assert kc.attach(model, [hooks.LogGradNorm()]) is model
    assert type(model) is kc.Functional
    history = model.fit(x, y, batch_size=16, verbose=0).history
    assert "grad_norm" in history and "weight_norm" not in history


# ----------------------------------------------------------- stages and logs
class _Recorder(kc.Hook):
    """Records the stages it runs (in Python: at trace time on JAX/TensorFlow)."""

    def __init__(self, calls=None, **kwargs):
        super().__init__(**kwargs)
        self.calls = calls if calls is not None else []

    def loss_term(self, model, x, y, y_pred, sample_weight, training):
        self.calls.append(("loss_term", training))
        return None

    def process_gradients(self, grads, variables, step):
        self.calls.append(("process_gradients", [v.path for v in variables]))
        return grads

    def after_update(self, model, step):
        self.calls.append(("after_update", None))


def test_stages_run_in_order_with_the_users_compute_loss(data):
    """A user's class that overrides `compute_loss` (allowed): its loss is the one
    differentiated, and the hooks' stages run around it in order."""
    x, y = data
    calls = []

    class WithLoss(UserNet):
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, **kw):
            calls.append(("compute_loss", None))
            loss = super().compute_loss(x, y, y_pred, sample_weight, **kw)
            return loss + 0.0 * keras.ops.sum(y_pred)

    model = WithLoss()
    model(x[:2])
    model.compile("sgd", "mse")
    kc.attach(model, [_Recorder(calls)])
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    kinds = [c[0] for c in calls]
    first = [
        kinds.index(k) for k in ("compute_loss", "process_gradients", "after_update")
    ]
    assert first == sorted(first), kinds
    assert kinds.index("loss_term") < kinds.index("process_gradients")
    seen = next(c[1] for c in calls if c[0] == "process_gradients")
    assert seen == [v.path for v in model.trainable_variables]


def test_logs_reach_history_csv_tensorboard_and_progress_bar(data, tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="keras.callbacks.TensorBoard needs it")
    from test_hooks_logging_ratio import read_scalars

    x, y = data
    model = build("subclass", x=x)
    model.compile("adam", "mse")
    kc.attach(model, [hooks.WeightPenalty(l2=1e-3), hooks.LogGradNorm()])
    csv = tmp_path / "log.csv"
    history = model.fit(
        x,
        y,
        batch_size=16,
        epochs=2,
        verbose=2,
        callbacks=[
            keras.callbacks.CSVLogger(str(csv)),
            keras.callbacks.TensorBoard(tmp_path / "tb"),
        ],
    ).history
    printed = capsys.readouterr().out
    assert "grad_norm:" in printed and "weight_penalty:" in printed
    rows = csv.read_text().splitlines()
    header = rows[0].split(",")
    assert {"grad_norm", "weight_penalty", "loss"} <= set(header) and len(rows) == 3
    column = header.index("grad_norm")
    np.testing.assert_allclose(
        [float(r.split(",")[column]) for r in rows[1:]], history["grad_norm"], rtol=1e-6
    )
    scalars = read_scalars(tmp_path / "tb")
    points = [v for _, v in scalars[("train", "epoch_grad_norm")]]
    np.testing.assert_allclose(points, history["grad_norm"], rtol=1e-6)


def test_train_on_batch_and_test_on_batch(data):
    x, y = data
    model = build("sequential", x=x)
    model.compile("sgd", "mse")
    kc.attach(model, [hooks.WeightPenalty(l2=1e-2), hooks.SkipNonFinite()])
    logs = model.train_on_batch(x[:8], y[:8], return_dict=True)
    assert logs["weight_penalty"] > 0 and logs["skipped_steps"] == 0.0
    before = [np.array(w) for w in model.get_weights()]
    bad = model.train_on_batch(np.full_like(x[:8], np.nan), y[:8], return_dict=True)
    assert bad["skipped_steps"] == 1.0
    for u, v in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(u, v)
    assert model.test_on_batch(x[:8], y[:8], return_dict=True)["weight_penalty"] > 0


def test_a_fit_with_its_own_signature_gets_the_check_callback(data):
    """A class whose `fit` orders its parameters differently (a KerasHub task:
    `fit(x, y, batch_size, sample_weight, validation_data, validation_split,
    **kwargs)`): `SkipNonFinite(max_consecutive)`'s check still runs, and no
    positional argument is taken for `callbacks`."""
    x, y = data

    class TaskLike(keras.Sequential):
        def fit(
            self,
            x=None,
            y=None,
            batch_size=None,
            sample_weight=None,
            validation_data=None,
            validation_split=None,
            **kwargs,
        ):
            assert validation_split in (None, 0.25), validation_split
            return super().fit(
                x,
                y,
                batch_size=batch_size,
                sample_weight=sample_weight,
                validation_split=validation_split or 0.0,
                **kwargs,
            )

    model = TaskLike([keras.Input((6,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    kc.attach(model, [hooks.SkipNonFinite(max_consecutive=2)])
    history = model.fit(x, y, 16, None, None, 0.25, verbose=0).history
    assert "val_loss" in history
    bad = np.full_like(x, np.nan)
    with pytest.raises(FloatingPointError, match="2 consecutive steps were skipped"):
        model.fit(bad, y, 16, None, None, 0.25, verbose=0)


# --------------------------------------- what holds for kc.Model holds attached
@pytest.fixture
def policy():
    previous = keras.mixed_precision.global_policy().name
    try:
        yield keras.mixed_precision.set_global_policy
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_mixed_precision_equals_kc_model(data, policy):
    x, y = nan_data(data)
    policy("mixed_float16")
    runs = []
    for twin in (True, False):
        model = build("functional", twin=twin, x=x)
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.05), initial_scale=2**8
        )
        if twin:
            model.compile(optimizer, "mse", hooks=stack())
        else:
            model.compile(optimizer, "mse")
            kc.attach(model, stack())
        history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        runs.append((model, history.history))
    (twin, twin_logs), (model, logs) = runs
    assert model.layers[1].compute_dtype == "float16"
    assert logs["skipped_steps"] == [1.0]
    assert_same_training(twin, model, twin_logs, logs)


@pytest.mark.parametrize("order", ["compile_then_attach", "attach_then_compile"])
def test_gradient_accumulation_equals_kc_model(data, order):
    x, y = data
    runs = []
    for twin in (True, False):
        model = build("subclass", twin=twin, x=x)
        optimizer = keras.optimizers.SGD(
            0.05, momentum=0.9, gradient_accumulation_steps=2
        )
        if twin:
            model.compile(optimizer, "mse", hooks=stack())
        elif order == "compile_then_attach":
            model.compile(optimizer, "mse")
            kc.attach(model, stack())
        else:
            kc.attach(model, stack())
            model.compile(optimizer, "mse")
        history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        runs.append((model, history.history))
    (twin, twin_logs), (model, logs) = runs
    assert model.gradient_accumulation_steps == 2
    assert int(model.optimizer.iterations) == 4  # 8 micro-batches, 4 updates
    assert_same_training(twin, model, twin_logs, logs)


def test_sharpness_aware_equals_kc_model(data):
    """The two-pass hook (a second forward and backward on the batch)."""
    x, y = data
    runs = []
    for twin in (True, False):
        model = build("sequential", twin=twin, x=x)
        make = [hooks.SharpnessAware(0.05), hooks.LogGradNorm()]
        if twin:
            model.compile(keras.optimizers.SGD(0.1), "mse", hooks=make)
        else:
            model.compile(keras.optimizers.SGD(0.1), "mse")
            kc.attach(model, make)
        history = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        runs.append((model, history.history))
    assert_same_training(runs[0][0], runs[1][0], runs[0][1], runs[1][1])


def _gradients(model, xb, yb):
    """The gradients of the MSE of `model` on a batch, by the backend's own means."""
    variables = model.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = keras.ops.mean(keras.ops.square(model(xb, training=True) - yb))
        return tape.gradient(loss, variables)
    if BACKEND == "jax":
        import jax

        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss_fn(values):
            pred, _ = model.stateless_call(values, non_trainable, xb)
            return keras.ops.mean(keras.ops.square(pred - yb))

        return jax.grad(loss_fn)([v.value for v in variables])
    import torch

    yb = keras.ops.convert_to_tensor(yb)
    loss = keras.ops.mean(keras.ops.square(model(xb, training=True) - yb))
    return list(torch.autograd.grad(loss, [v.value for v in variables]))


def test_apply_hooks_in_a_hand_written_loop(data):
    """An attached model's `apply_hooks` in the user's own loop == `fit`."""
    x, y = data

    def make():
        return [hooks.ClipByGlobalNorm(0.05), hooks.LogGradNorm()]

    fitted = build("subclass", twin=True, x=x)
    fitted.compile(keras.optimizers.SGD(0.1), "mse", hooks=make())
    fitted.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    looped = build("subclass", x=x)
    looped.compile(keras.optimizers.SGD(0.1), "mse")
    kc.attach(looped, make())
    for i in range(0, 64, 16):
        grads = _gradients(looped, x[i : i + 16], y[i : i + 16])
        if BACKEND == "torch":
            import torch

            with torch.no_grad():
                looped.apply_hooks(grads)
        else:
            looped.apply_hooks(grads)
    assert int(looped.optimizer.iterations) == 4
    for u, v in zip(fitted.get_weights(), looped.get_weights(), strict=True):
        np.testing.assert_allclose(v, u, rtol=1e-6, atol=1e-7)
    assert float(looped.get_metrics_result()["grad_norm"]) <= 0.05 * (1 + 1e-6)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "model, message",
    [
        (lambda: keras.layers.Dense(2), "Received: model=<Dense"),
        (lambda: "model.keras", "Received: model='model.keras' of type str"),
        (lambda: keras.Sequential, "this is the class Sequential, not a model"),
        (lambda: None, "Received: model=None"),
    ],
    ids=["layer", "path", "class", "none"],
)
def test_attach_to_what_is_not_a_model(model, message):
    with pytest.raises(TypeError, match="attach: `model` must be a keras.Model") as info:
        kc.attach(model(), [hooks.LogGradNorm()])
    assert message in str(info.value)


def test_the_same_hook_on_two_models(data):
    x, _ = data
    first, second = build("functional", x=x), build("sequential", x=x)
    first.compile("sgd", "mse")
    second.compile("sgd", "mse")
    log = hooks.LogGradNorm()
    kc.attach(first, [log])
    with pytest.raises(
        ValueError,
        match=r"`hooks\[1\]` \(LogGradNorm\(name='grad_norm'\)\)"
        r" is already attached to the model 'net'",
    ):
        kc.attach(second, [hooks.LogWeightNorm(), log])
    assert type(second) is keras.Sequential  # left as it was
    assert first.hooks == [log]
    # The same instance twice in one list.
    with pytest.raises(
        ValueError, match=r"attach: `hooks\[1\]` .* same object as `hooks\[0\]`"
    ):
        kc.attach(second, [log, log])
    assert type(second) is keras.Sequential


def test_bad_hooks_argument_leaves_the_model(data):
    x, _ = data
    model = build("functional", x=x)
    own = type(model)
    for bad, message in [
        (
            "clip",
            "attach: `hooks` must be a list of keras_custom.Hook instances. "
            "Received: hooks='clip'",
        ),
        ([hooks.LogGradNorm(), "clip"], "attach: `hooks[1]` must be a keras_custom.Hook"),
        ([hooks.ClipByGlobalNorm], "attach: `hooks[0]` is the class ClipByGlobalNorm"),
        ({hooks.LogGradNorm()}, "hooks run in list order"),
    ]:
        with pytest.raises(TypeError) as info:
            kc.attach(model, bad)
        assert message in str(info.value)
        assert type(model) is own and not isinstance(model, Trainer)


def test_a_model_that_writes_its_own_train_step(data):
    x, y = data

    class OwnStep(keras.Sequential):
        def train_step(self, *args, **kwargs):
            return super().train_step(*args, **kwargs)

    model = OwnStep([keras.Input((6,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    with pytest.raises(TypeError) as info:
        kc.attach(model, [hooks.ClipByGlobalNorm(1.0)])
    message = str(info.value)
    assert "OwnStep of `model` overrides `train_step`" in message
    assert (
        "self.apply_hooks(grads)" in message
        and "Received: model of class OwnStep" in message
    )
    assert "derive the class from `keras_custom.Model`" in message
    assert type(model) is OwnStep and not isinstance(model, Trainer)
    model.fit(x, y, verbose=0)  # still the user's model, untouched


@only_backends("tensorflow")
def test_the_route_the_train_step_error_gives(data):
    """What the error above suggests works: the class derived from kc.Model keeps
    its own step and calls `self.apply_hooks(grads)` in it."""
    import tensorflow as tf

    x, y = data

    class OwnStep(kc.Sequential):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
            self.apply_hooks(tape.gradient(loss, self.trainable_variables))
            return {"loss": loss}

    model = OwnStep([keras.Input((6,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    clip = hooks.ClipByGlobalNorm(1e-3)
    kc.attach(model, [clip, hooks.LogGradNorm()])
    before = model.get_weights()
    model.fit(x[:16], y[:16], batch_size=16, verbose=0)
    step = np.concatenate([np.ravel(a - b) for a, b in zip(before, model.get_weights())])
    np.testing.assert_allclose(np.linalg.norm(step), 0.1 * 1e-3, rtol=1e-3)


def test_a_model_whose_attribute_the_step_would_hide(data):
    x, _ = data

    class WithHooks(keras.Sequential):
        def forward_pass(self, x):  # the user's own, not our stage
            return self(x)

    model = WithHooks([keras.Input((6,)), keras.layers.Dense(1)])
    with pytest.raises(TypeError, match="has its own `forward_pass`"):
        kc.attach(model, [])
    assert type(model) is WithHooks
    plain = build("sequential", x=x)
    plain.hooks = ["the user's"]
    with pytest.raises(TypeError, match="has its own `hooks`"):
        kc.attach(plain, [])
    assert plain.hooks == ["the user's"] and type(plain) is keras.Sequential


def test_a_failed_attach_leaves_a_model_with_hooks(data):
    x, y = data
    model = build("functional", x=x)
    model.compile("sgd", "mse")
    log = hooks.LogGradNorm()
    kc.attach(model, [log])
    with pytest.raises(TypeError):
        kc.attach(model, [hooks.LogWeightNorm(), 3])
    assert model.hooks == [log]
    # A hook that refuses the model when it is built (built model, optimizer).
    with pytest.raises(ValueError, match="`include` pattern 'lora' matches no"):
        kc.attach(model, [hooks.LogWeightNorm(), hooks.WeightPenalty(include="lora")])
    assert model.hooks == [log]
    assert "grad_norm" in model.fit(x, y, batch_size=16, verbose=0).history


def test_a_failed_attach_leaves_a_plain_model(data):
    x, _ = data
    model = build("subclass", x=x)
    model.compile("sgd", "mse")
    attributes = set(model.__dict__)
    with pytest.raises(ValueError, match="`include` pattern 'lora' matches no"):
        kc.attach(model, [hooks.WeightPenalty(include="lora")])
    assert type(model) is UserNet and set(model.__dict__) == attributes


# ---------------------------------------------------------------------- saving
def _config(path):
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("config.json"))


@pytest.mark.parametrize("kind", KINDS)
def test_file_names_the_models_own_class_and_restores_hooks(data, tmp_path, kind):
    x, y = data
    model = build(kind, x=x)
    model.compile(keras.optimizers.Adam(0.01), "mse", metrics=["mae"])
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    model.save(tmp_path / "plain.keras")
    kc.attach(model, stack())
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    model.hooks[2].max_norm = 0.04  # state that differs from the config's
    model.save(tmp_path / "hooked.keras")

    plain, hooked = _config(tmp_path / "plain.keras"), _config(tmp_path / "hooked.keras")
    part = hooked.pop("keras_custom")
    assert part["attached"] is True and part["class"] is None
    assert [h["class_name"] for h in part["hooks"]] == [type(h).__name__ for h in stack()]
    # Everything but our key is what the plain model writes.
    for key in ("module", "class_name", "registered_name", "config", "build_config"):
        assert hooked.get(key) == plain.get(key), key
    assert hooked["compile_config"] == public_optimizers(plain["compile_config"])
    own = {"functional": "Functional", "sequential": "Sequential", "subclass": "UserNet"}
    assert hooked["class_name"] == own[kind]

    restored = keras.models.load_model(tmp_path / "hooked.keras")  # safe_mode=True
    assert type(restored) is type(model) and isinstance(restored, Trainer)
    assert [h.get_config() for h in restored.hooks] == [
        h.get_config() for h in model.hooks
    ]
    assert restored.hooks[2].max_norm == np.float32(0.04)
    for u, v in zip(state_of(model), state_of(restored), strict=True):
        np.testing.assert_array_equal(u, v)
    for u, v in zip(model.optimizer.variables, restored.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    np.testing.assert_array_equal(
        model.predict(x, verbose=0), restored.predict(x, verbose=0)
    )
    # Resumed == uninterrupted.
    a = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0).history
    b = restored.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0).history
    assert_same_training(model, restored, a, b)


def test_file_with_accumulation_resumes(data, tmp_path):
    x, y = data

    def make():
        model = build("subclass", x=x)
        optimizer = keras.optimizers.SGD(
            0.05, momentum=0.9, gradient_accumulation_steps=2
        )
        model.compile(optimizer, "mse")
        return kc.attach(model, [hooks.ClipByGlobalNorm(0.05), hooks.LogGradNorm()])

    straight = make()
    straight.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    first = make()
    first.fit(x[:24], y[:24], batch_size=8, epochs=1, shuffle=False, verbose=0)  # odd
    first.save(tmp_path / "m.keras")
    restored = keras.models.load_model(tmp_path / "m.keras")
    assert restored.gradient_accumulation_steps == 2
    assert int(np.asarray(restored._kc_accumulator.count)) == 1  # mid-accumulation
    restored.fit(x[24:], y[24:], batch_size=8, epochs=1, shuffle=False, verbose=0)
    restored.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert int(restored.optimizer.iterations) == int(straight.optimizer.iterations) == 8
    for u, v in zip(straight.get_weights(), restored.get_weights(), strict=True):
        np.testing.assert_allclose(v, u, rtol=1e-6, atol=1e-7)


# Loads files where keras_custom cannot be imported: `import keras_custom` raises
# ImportError, as where the package is not installed.
PLAIN_LOAD = r"""
import json, sys, warnings

class NoKerasCustom:
    def find_spec(self, name, path=None, target=None):
        if name == "keras_custom" or name.startswith("keras_custom."):
            raise ModuleNotFoundError(f"No module named {{name!r}}")

sys.meta_path.insert(0, NoKerasCustom())
import keras
import numpy as np

{setup}

report = {{}}
for name in json.loads(sys.argv[2]):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = keras.models.load_model(f"{{sys.argv[1]}}/{{name}}.keras")
        pred = model.predict(np.load(f"{{sys.argv[1]}}/x.npy"), verbose=0)
    np.save(f"{{sys.argv[1]}}/{{name}}.pred.npy", np.asarray(pred))
    report[name] = {{
        "class": type(model).__module__ + "." + type(model).__qualname__,
        "hooks": hasattr(model, "hooks"),
        "warnings": sorted({{str(w.message)[:160] for w in caught}}),
    }}
assert "keras_custom" not in sys.modules
print(json.dumps(report))
"""

USER_NET_SOURCE = textwrap.dedent(
    """
    @keras.saving.register_keras_serializable(package="tests_attach")
    class UserNet(keras.Model):
        def __init__(self, units=8, scale=0.5, **kwargs):
            super().__init__(**kwargs)
            self.units = units
            self.scale = scale
            self.hidden = keras.layers.Dense(units, activation="tanh", name="hidden")
            self.out = keras.layers.Dense(1, name="out")

        def call(self, x):
            return self.out(self.hidden(x)) * self.scale

        def get_config(self):
            return {**super().get_config(), "units": self.units, "scale": self.scale}
    """
)


def load_without_keras_custom(directory, names, setup=""):
    """Loads `directory/<name>.keras` in a process where keras_custom cannot be
    imported; returns its report and writes `<name>.pred.npy` there."""
    script = PLAIN_LOAD.format(setup=setup)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-c", script, str(directory), json.dumps(names)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_files_load_without_keras_custom(data, tmp_path):
    """The same files load as the plain models, with identical predictions, and
    with the warnings (none) of a file the plain model wrote."""
    x, y = data
    np.save(tmp_path / "x.npy", x)
    names, expected = [], {}
    for kind in KINDS:
        model = build(kind, x=x)
        model.compile(keras.optimizers.Adam(0.01), "mse")
        kc.attach(model, stack())
        model.fit(nan_data(data)[0], y, batch_size=8, epochs=1, verbose=0)
        model.save(tmp_path / f"{kind}.keras")
        kc.attach(model, [])
        model.save(tmp_path / f"{kind}_plain.keras")
        names += [kind, f"{kind}_plain"]
        expected[kind] = model.predict(x, verbose=0)
    report = load_without_keras_custom(tmp_path, names, setup=USER_NET_SOURCE)
    classes = {
        "functional": "keras.src.models.functional.Functional",
        "sequential": "keras.src.models.sequential.Sequential",
        "subclass": "__main__.UserNet",
    }
    for kind in KINDS:
        got, plain = report[kind], report[f"{kind}_plain"]
        assert got["class"] == classes[kind] and not got["hooks"]
        # (Not necessarily none: the libraries of a backend may warn on their own,
        # e.g. NumPy about PyTorch's `__array__`, for the plain file too.)
        assert got["warnings"] == plain["warnings"]
        assert not any("keras_custom" in w or "hook" in w for w in got["warnings"])
        np.testing.assert_array_equal(
            np.load(tmp_path / f"{kind}.pred.npy"), expected[kind]
        )
