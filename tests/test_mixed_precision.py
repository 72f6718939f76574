"""Mixed precision: the gradient hooks see the true (unscaled) gradient.

Under `mixed_float16` Keras wraps the optimizer in a `LossScaleOptimizer`; the
model unscales the gradients before the hooks, applies each update once, and lets
the loss scale skip the steps whose scaled gradients overflowed. Every test sets
the global policy and puts it back in a `finally` (the `policy` fixture).
"""

import keras
import numpy as np
import pytest
from conftest import mlp

import keras_custom as kc
from keras_custom import hooks


@pytest.fixture
def policy():
    previous = keras.mixed_precision.global_policy().name
    try:
        yield keras.mixed_precision.set_global_policy
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _fit(data, make_hooks, optimizer=None, epochs=1):
    x, y = data
    model = mlp(kc.Model, units=16)
    model.compile(optimizer or keras.optimizers.SGD(0.05), "mse", hooks=make_hooks())
    history = model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    return model, history.history


def _logged():
    return [
        hooks.LogGradNorm(name="grad_norm_raw"),
        hooks.ClipByGlobalNorm(0.2),
        hooks.LogGradNorm(),
    ]


@pytest.mark.parametrize(
    "name,tolerance", [("mixed_float16", 0.01), ("mixed_bfloat16", 0.05)]
)
def test_hooks_see_unscaled_gradients(data, policy, name, tolerance):
    _, reference = _fit(data, _logged)
    policy(name)
    optimizer = keras.optimizers.SGD(0.05)
    if name == "mixed_float16":
        # Keras's first scale, 2**15, overflows float16 on this problem (the
        # steps would be skipped, the norms inf); 2**8 does not.
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=2**8)
    model, mixed = _fit(data, _logged, optimizer)
    assert model.layers[1].compute_dtype == name.split("_")[1]
    if name == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    # The scale (2**15 at first) is not in what the hooks see.
    np.testing.assert_allclose(
        mixed["grad_norm_raw"], reference["grad_norm_raw"], rtol=tolerance
    )
    assert mixed["grad_norm_raw"][0] > 0.4  # the clip bites
    # The clip bound holds on the true gradient.
    assert mixed["grad_norm"][0] <= 0.2 * (1 + 1e-5)
    np.testing.assert_allclose(mixed["grad_norm"], reference["grad_norm"], rtol=1e-5)


def test_clipped_update_has_the_true_size(data, policy):
    """One SGD step after ClipByGlobalNorm(c) moves the weights by lr * c."""
    policy("mixed_float16")
    x, y = data
    model = mlp(kc.Model)
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1), initial_scale=2**8
    )
    model.compile(optimizer, "mse", hooks=[hooks.ClipByGlobalNorm(0.2)])
    before = [np.array(w) for w in model.get_weights()]
    model.train_on_batch(x[:16], y[:16])
    after = [np.array(w) for w in model.get_weights()]
    moved = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(after, before)))
    np.testing.assert_allclose(moved, 0.1 * 0.2, rtol=1e-3)


def test_no_hooks_matches_plain_keras(data, policy):
    """Each update is applied once, the loss scale moves as Keras moves it."""
    policy("mixed_float16")
    x, y = data
    models = []
    for cls in (keras.Model, kc.Model):
        model = mlp(cls)
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.05), dynamic_growth_steps=2
        )
        model.compile(optimizer, "mse")
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        models.append(model)
    plain, ours = models
    for a, b in zip(plain.get_weights(), ours.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(ours.optimizer.iterations) == int(plain.optimizer.iterations) > 0
    assert float(ours.optimizer.dynamic_scale) == float(plain.optimizer.dynamic_scale)
    assert int(ours.optimizer.step_counter) == int(plain.optimizer.step_counter)


class _RecordOverflow(kc.Hook):
    """Counts the steps the loss scale skips, as a guard would read them."""

    def build(self, model):
        self.declare_log("overflows", reduction="sum")

    def process_gradients(self, grads, variables, step):
        overflow = self.step_state.model.loss_scale_overflow()
        assert overflow is not None
        self.log("overflows", keras.ops.cast(overflow, "float32"), reduction="sum")
        return grads


def test_overflow_step_is_skipped_once_and_visible_to_hooks(data, policy):
    policy("mixed_float16")
    x, y = data
    x, y = x[:32], y[:32].copy()
    y[:16] *= 1e4  # the first batch: scaled float16 gradients overflow
    model = mlp(kc.Model)
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(1e-3), initial_scale=2**8
    )
    model.compile(optimizer, "mse", hooks=[_RecordOverflow()])
    model.build((None, 6))
    before = [np.array(w) for w in model.get_weights()]
    logs = model.train_on_batch(x[:16], y[:16], return_dict=True)
    assert logs["overflows"] == 1.0
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    assert int(model.optimizer.iterations) == 0
    assert float(model.optimizer.dynamic_scale) == 2.0**7
    model.reset_metrics()  # per-call logs (Keras before 3.15 accumulates them)
    logs = model.train_on_batch(x[16:], y[16:], return_dict=True)
    assert logs["overflows"] == 0.0
    assert int(model.optimizer.iterations) == 1


def test_no_loss_scale_no_overflow_flag(data):
    seen = []

    class Probe(kc.Hook):
        def process_gradients(self, grads, variables, step):
            seen.append(self.step_state.model.loss_scale_overflow())
            return grads

    model = mlp(kc.Model)
    model.compile("sgd", "mse", hooks=[Probe()])
    model.train_on_batch(*[a[:8] for a in data])
    assert seen and all(s is None for s in seen)


def test_skip_non_finite_does_not_count_loss_scale_overflows(data, policy):
    """The scaler's own overflow step is skipped once, and not counted as a skip."""
    policy("mixed_float16")
    x, y = data
    x, y = x[:32], y[:32].copy()
    y[:16] *= 1e4  # the first batch: scaled float16 gradients overflow, loss finite
    model = mlp(kc.Model)
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(1e-3), initial_scale=2**8
    )
    model.compile(
        optimizer,
        "mse",
        hooks=[hooks.SkipNonFinite(max_consecutive=1), _RecordOverflow()],
    )
    logs = model.train_on_batch(x[:16], y[:16], return_dict=True)
    assert logs["overflows"] == 1.0  # the scaler skipped it...
    assert np.isfinite(logs["loss"])
    assert logs["skipped_steps"] == 0.0  # ...and the guard did not count it
    assert int(model.optimizer.iterations) == 0
    assert int(model.hooks[0].consecutive) == 0
    logs = model.train_on_batch(x[16:], y[16:], return_dict=True)  # no error raised
    assert logs["skipped_steps"] == 0.0 and int(model.optimizer.iterations) == 1
    bad = y[16:].copy()
    bad[0] = np.nan  # a non-finite loss still counts
    with pytest.raises(FloatingPointError, match="the loss is not finite"):
        model.train_on_batch(x[16:], bad)
