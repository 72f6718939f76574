"""Several optimizers: Keras's `MultiOptimizer` works unchanged, and the gradient
hooks see every trainable variable at once (one global norm across the groups)."""

import keras
import numpy as np
import pytest
from conftest import KERAS_VERSION
from conftest import mlp

import keras_custom as kc
from keras_custom import hooks

pytestmark = pytest.mark.skipif(
    KERAS_VERSION < (3, 15), reason="keras.optimizers.MultiOptimizer is new in Keras 3.15"
)


def _multi(lr_hidden=0.1, lr_out=0.1, hidden=None):
    optimizers = keras.optimizers.OptimizerMap(
        default_optimizer=keras.optimizers.SGD(lr_out),
        optimizer_map={"hidden/.*": hidden or keras.optimizers.SGD(lr_hidden)},
    )
    return keras.optimizers.MultiOptimizer(optimizers)


class _Seen(kc.Hook):
    def process_gradients(self, grads, variables, step):
        self.paths = [v.path for v in variables]
        return grads


def test_one_global_norm_across_groups(data):
    x, y = data
    seen = _Seen()
    runs = []
    for optimizer, extra in ((keras.optimizers.SGD(0.1), []), (_multi(), [seen])):
        model = mlp(kc.Model)
        model.compile(
            optimizer,
            "mse",
            hooks=extra
            + [
                hooks.LogGradNorm(name="raw"),
                hooks.ClipByGlobalNorm(0.2),
                hooks.LogGradNorm(),
            ],
        )
        logs = model.fit(x, 5 * y, batch_size=16, shuffle=False, verbose=0).history
        runs.append((model, logs))
    (single, h1), (multi, h2) = runs
    assert sorted(seen.paths) == sorted(v.path for v in multi.trainable_variables)
    assert h1["raw"][0] > 0.2  # the clip bites
    np.testing.assert_allclose(h2["grad_norm"], h1["grad_norm"], rtol=1e-6)
    for a, b in zip(single.get_weights(), multi.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # Per-group clipping would give another result.
    assert max(h2["grad_norm"]) <= 0.2 * (1 + 1e-5)


def test_two_learning_rates_apply_to_their_group(data):
    x, y = data
    model = mlp(kc.Model)
    model.compile(
        _multi(lr_hidden=0.0, lr_out=0.1), "mse", hooks=[hooks.ClipByGlobalNorm(1.0)]
    )
    before = {v.path: keras.ops.convert_to_numpy(v) for v in model.trainable_variables}
    model.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    for v in model.trainable_variables:
        same = np.array_equal(before[v.path], keras.ops.convert_to_numpy(v))
        assert same == v.path.startswith("hidden"), v.path


def test_both_optimizer_states_save_and_reload(data, tmp_path):
    x, y = data

    def make():
        model = mlp(kc.Model)
        model.compile(
            _multi(lr_out=0.05, hidden=keras.optimizers.Adam(0.01)),
            "mse",
            hooks=[hooks.ClipByGlobalNorm(0.5)],
        )
        return model

    a = make()
    a.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    path = str(tmp_path / "multi.keras")
    a.save(path)
    b = keras.models.load_model(path)
    assert isinstance(b.optimizer, keras.optimizers.MultiOptimizer)
    assert [type(o).__name__ for o in b.optimizer.optimizers] == ["Adam", "SGD"]
    for va, vb in zip(a.optimizer.variables, b.optimizer.variables):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(va), keras.ops.convert_to_numpy(vb)
        )
    for model in (a, b):
        model.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
