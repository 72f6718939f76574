"""docs/two-players.md: a GAN written by overriding stages (two losses, two
optimizers), with d_loss/g_loss in the logs and both optimizers saved."""

import pathlib
import re

import keras
import numpy as np
import pytest
from conftest import KERAS_VERSION

import keras_custom as kc

pytestmark = pytest.mark.skipif(
    KERAS_VERSION < (3, 15), reason="keras.optimizers.MultiOptimizer is new in Keras 3.15"
)

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "two-players.md"


@pytest.fixture(scope="module")
def example():
    """Runs the page's example; returns its namespace (GAN, make_gan, gan, real)."""
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[0]
    namespace = {"__name__": "two_players_example"}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace


def test_logs_hold_both_players_losses(example):
    history = example["history"].history
    assert len(history["d_loss"]) == len(history["g_loss"]) == 2
    np.testing.assert_allclose(history["d_loss"], history["loss"], rtol=1e-6)
    assert all(np.isfinite(history["g_loss"]))


def test_both_players_train_with_their_own_optimizer(example):
    fresh = example["make_gan"]()
    gan = example["gan"]
    for name in ("generator", "discriminator"):
        before = fresh.get_layer(name).get_weights()
        after = gan.get_layer(name).get_weights()
        assert any(not np.array_equal(a, b) for a, b in zip(before, after)), name
    g_opt, d_opt = gan.optimizer.optimizers  # the map's first, then the default
    assert float(g_opt.learning_rate) == pytest.approx(2e-3)
    assert float(d_opt.learning_rate) == pytest.approx(1e-3)
    assert int(d_opt.iterations) == int(g_opt.iterations) == 8
    assert all("g_" in v.path for v in g_opt.variables[2:]) and g_opt.variables[2:]
    assert all("d_" in v.path for v in d_opt.variables[2:]) and d_opt.variables[2:]


def test_objective_is_none_outside_a_second_pass(example):
    assert example["gan"].objective is None


def test_save_reload_resumes_both_optimizers(example, tmp_path):
    make_gan, real = example["make_gan"], example["real"]
    a = make_gan()
    a.fit(real, batch_size=16, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "gan.keras")
    a.save(path)
    b = keras.models.load_model(path)
    assert isinstance(b, example["GAN"]) and isinstance(b, kc.Model)
    for oa, ob in zip(a.optimizer.optimizers, b.optimizer.optimizers):
        assert len(oa.variables) == len(ob.variables)
        for va, vb in zip(oa.variables, ob.variables):
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(va), keras.ops.convert_to_numpy(vb)
            )
    ha = a.fit(real, batch_size=16, epochs=1, shuffle=False, verbose=0).history
    hb = b.fit(real, batch_size=16, epochs=1, shuffle=False, verbose=0).history
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert ha["g_loss"] == hb["g_loss"]
