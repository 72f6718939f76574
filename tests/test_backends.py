"""Same math on every backend: a hooked model against a NumPy reference.

The same file runs under TensorFlow, JAX and PyTorch (`tests/run.py`). The model,
its initial weights (set from NumPy), the data and the hooks are the same; the
reference is the training loop written out by hand in float64 NumPy (forward pass,
backward pass, penalty, global-norm clipping, SGD or Adam as Keras defines them).
Each backend must land on the reference within float32 tolerance, so the three
backends agree with each other too.
"""

import keras
import numpy as np
import pytest
from conftest import only_backends
from keras import ops

import keras_custom as kc
from keras_custom import hooks

L2 = 0.01
MAX_NORM = 2.2  # clips some steps, not others, with either optimizer
LR = 0.1
BATCH = 8
STEPS = 5


def setup():
    rng = np.random.default_rng(42)
    x = rng.normal(size=(BATCH * STEPS, 3))
    y = np.sin(x @ np.array([[1.0], [-2.0], [0.5]])) + 0.3
    weights = [
        rng.normal(scale=0.7, size=(3, 4)),
        rng.normal(scale=0.1, size=(4,)),
        rng.normal(scale=0.7, size=(4, 1)),
        rng.normal(scale=0.1, size=(1,)),
    ]
    return (
        x.astype("float32"),
        y.astype("float32"),
        [w.astype("float32") for w in weights],
    )


def reference(x, y, weights, optimizer):
    """Five steps of the hooked model, by hand (float64).

    Returns the final weights and the per-step logs (`loss`, `weight_penalty`,
    `grad_norm` after clipping).
    """
    w1, b1, w2, b2 = [w.astype("float64") for w in weights]
    params = [w1, b1, w2, b2]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    logs = {"loss": [], "weight_penalty": [], "grad_norm": []}
    for step in range(STEPS):
        xb = x[step * BATCH : (step + 1) * BATCH].astype("float64")
        yb = y[step * BATCH : (step + 1) * BATCH].astype("float64")
        w1, b1, w2, b2 = params
        # forward: Dense(4, tanh) -> Dense(1); mean squared error; L2 on kernels
        h = np.tanh(xb @ w1 + b1)
        p = h @ w2 + b2
        penalty = L2 * (np.sum(w1**2) + np.sum(w2**2))
        loss = np.mean((p - yb) ** 2) + penalty
        # backward
        dp = 2.0 * (p - yb) / len(xb)
        dw2 = h.T @ dp + 2.0 * L2 * w2
        db2 = dp.sum(axis=0)
        dz = (dp @ w2.T) * (1.0 - h**2)
        dw1 = xb.T @ dz + 2.0 * L2 * w1
        db1 = dz.sum(axis=0)
        grads = [dw1, db1, dw2, db2]
        # ClipByGlobalNorm, then LogGradNorm (sees the clipped gradient)
        norm = np.sqrt(sum(np.sum(g**2) for g in grads))
        grads = [g * MAX_NORM / max(norm, MAX_NORM) for g in grads]
        logs["loss"].append(loss)
        logs["weight_penalty"].append(penalty)
        logs["grad_norm"].append(min(norm, MAX_NORM))
        if optimizer == "sgd":
            params = [w - LR * g for w, g in zip(params, grads)]
        else:  # keras.optimizers.Adam's update, defaults beta_1=0.9 ...
            b1_, b2_, eps = 0.9, 0.999, 1e-7
            t = step + 1
            alpha = LR * np.sqrt(1 - b2_**t) / (1 - b1_**t)
            m = [mi + (g - mi) * (1 - b1_) for mi, g in zip(m, grads)]
            v = [vi + (g**2 - vi) * (1 - b2_) for vi, g in zip(v, grads)]
            params = [
                w - alpha * mi / (np.sqrt(vi) + eps) for w, mi, vi in zip(params, m, v)
            ]
    return params, logs


def hooked_model(weights, optimizer):
    model = kc.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.set_weights(weights)
    opt = keras.optimizers.SGD(LR) if optimizer == "sgd" else keras.optimizers.Adam(LR)
    model.compile(
        opt,
        "mse",
        hooks=[
            hooks.WeightPenalty(l2=L2),
            hooks.ClipByGlobalNorm(MAX_NORM),
            hooks.LogGradNorm(),
        ],
    )
    return model


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_reference_clips_some_steps_and_not_others(optimizer):
    # The case must exercise both branches of the clipping, or it proves little.
    x, y, weights = setup()
    _, logs = reference(x, y, weights, optimizer)
    norms = np.array(logs["grad_norm"])
    assert np.any(norms == MAX_NORM) and np.any(norms < MAX_NORM)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_five_steps_match_numpy_reference(optimizer):
    x, y, weights = setup()
    expected, logs = reference(x, y, weights, optimizer)
    model = hooked_model(weights, optimizer)
    history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations) == STEPS
    for got, want in zip(model.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for name in ("loss", "weight_penalty", "grad_norm"):
        assert history.history[name][0] == pytest.approx(np.mean(logs[name]), rel=1e-5)


def test_train_on_batch_matches_fit():
    x, y, weights = setup()
    expected, _ = reference(x, y, weights, "adam")
    model = hooked_model(weights, "adam")
    for step in range(STEPS):
        batch = slice(step * BATCH, (step + 1) * BATCH)
        model.train_on_batch(x[batch], y[batch])
    for got, want in zip(model.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------- hook state per backend
@keras.saving.register_keras_serializable(package="keras_custom_tests")
class CountSteps(kc.Hook):
    """Counts updates and sums their step numbers, in its own variables."""

    def build(self, model):
        super().build(model)
        self.count = self.add_variable(dtype="int32", name="count")
        self.total = self.add_variable(name="total")

    def after_update(self, model, step):
        self.count.assign(self.count + 1)
        self.total.assign(self.total + ops.cast(step, "float32"))


def test_hook_state_is_exact_after_steps_and_saved(tmp_path):
    # On JAX the state goes in and out of the jitted stateless step every batch.
    x, y, weights = setup()
    model = hooked_model(weights, "adam")
    counter = CountSteps()
    model.compile(model.optimizer, "mse", hooks=[counter, *model.hooks])
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    assert int(ops.convert_to_numpy(counter.count)) == 2 * STEPS
    assert float(ops.convert_to_numpy(counter.total)) == sum(range(2 * STEPS))
    model.save(tmp_path / "m.keras")
    restored = keras.models.load_model(tmp_path / "m.keras")
    again = restored.hooks[0]
    assert int(ops.convert_to_numpy(again.count)) == 2 * STEPS
    restored.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert int(ops.convert_to_numpy(again.count)) == 3 * STEPS
    assert float(ops.convert_to_numpy(again.total)) == sum(range(3 * STEPS))


class LogsUndeclared(kc.Hook):
    def process_gradients(self, grads, variables, step):
        self.log("surprise", 1.0)
        return grads


def test_undeclared_log_name():
    """A hook logs a name it never declared: it works the same on every backend
    (on JAX the first step is traced once more, with the new tracker)."""
    x, y, weights = setup()
    model = hooked_model(weights, "sgd")
    model.compile("sgd", "mse", hooks=[LogsUndeclared()])
    history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0)
    assert history.history["surprise"] == [1.0, 1.0]
    again = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    assert again.history["surprise"] == [1.0]


@only_backends("torch")
def test_torch_leaves_no_grad_behind():
    # Gradients come from a fresh autograd pass: nothing accumulates in `.grad`.
    x, y, weights = setup()
    model = hooked_model(weights, "sgd")
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    assert all(v.value.grad is None for v in model.trainable_variables)


@only_backends("torch")
def test_torch_compile_matches_reference():
    x, y, weights = setup()
    expected, _ = reference(x, y, weights, "sgd")
    model = hooked_model(weights, "sgd")
    model.compile(model.optimizer, "mse", hooks=model.hooks, jit_compile=True)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(model.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
