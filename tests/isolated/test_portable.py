""".keras files are portable: saved under one backend, resumed under each other.

For every backend (TensorFlow, JAX, PyTorch) a subprocess trains a hooked model one
epoch, saves it, trains one more epoch and writes what it ended with. This process,
whatever backend `tests/run.py` gave it, loads each file, checks the hooks came back
with their configuration and state, trains the same extra epoch and must land where
the writer did (float32 tolerance: the backends' kernels differ in rounding).

Also runnable as a script: `python test_portable.py DIR` writes DIR/<backend>.keras
and DIR/<backend>.npz under the current KERAS_BACKEND.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np

BACKENDS = ("tensorflow", "jax", "torch")


def data():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(48, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 1)) - 0.2).astype("float32")
    x[40:] = np.nan  # the last batch of the first epoch is skipped
    weights = [
        rng.normal(scale=0.5, size=(4, 6)).astype("float32"),
        np.zeros(6, "float32"),
        rng.normal(scale=0.5, size=(6, 1)).astype("float32"),
        np.zeros(1, "float32"),
    ]
    return x, y, weights


def build_and_train():
    import keras

    import keras_custom as kc
    from keras_custom import hooks

    x, y, weights = data()
    model = kc.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, activation="tanh", name="d1"),
            keras.layers.Dense(1, name="d2"),
        ]
    )
    model.set_weights(weights)
    clip = hooks.ClipByGlobalNorm(1.0)
    model.compile(
        keras.optimizers.Adam(0.02),
        "mse",
        hooks=[
            hooks.WeightPenalty(l2=1e-2, exclude="d2"),
            hooks.SkipNonFinite(max_consecutive=3),
            clip,
            hooks.LogGradNorm(),
        ],
    )
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    clip.max_norm = 0.5  # a strength changed after build lives in its variable
    return model


def hook_state(model):
    return [np.asarray(v) for h in model.hooks for v in h.variables]


def resume(model):
    x, y, _ = data()
    history = model.fit(x[:40], y[:40], batch_size=8, epochs=1, shuffle=False, verbose=0)
    return history.history


def write(directory):
    import keras

    directory = pathlib.Path(directory)
    backend = keras.backend.backend()
    model = build_and_train()
    model.save(directory / f"{backend}.keras")
    saved_state = hook_state(model)
    iterations = int(model.optimizer.iterations)
    logs = resume(model)
    arrays = {f"weight_{i}": w for i, w in enumerate(model.get_weights())}
    arrays.update({f"saved_state_{i}": s for i, s in enumerate(saved_state)})
    arrays.update({f"final_state_{i}": s for i, s in enumerate(hook_state(model))})
    arrays["iterations"] = np.array(iterations)
    arrays["loss"] = np.array(logs["loss"])
    arrays["grad_norm"] = np.array(logs["grad_norm"])
    np.savez(directory / f"{backend}.npz", **arrays)


def _ordered(npz, prefix):
    keys = sorted(
        (k for k in npz.files if k.startswith(prefix)),
        key=lambda k: int(k.rsplit("_", 1)[1]),
    )
    return [npz[k] for k in keys]


if __name__ != "__main__":
    import keras
    import pytest

    @pytest.fixture(scope="module")
    def written(tmp_path_factory):
        # tests/run.py shares one folder between this file's runs under each
        # backend (KC_PORTABLE_FILES): a writer that has run need not run again.
        shared = os.environ.get("KC_PORTABLE_FILES")
        if shared:
            directory = pathlib.Path(shared)
        else:
            directory = tmp_path_factory.mktemp("portable")
        root = pathlib.Path(__file__).resolve().parents[2]
        procs = []
        for backend in BACKENDS:
            if (directory / f"{backend}.npz").exists():
                continue
            env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
            env.pop("XLA_FLAGS", None)
            procs.append(
                (
                    backend,
                    subprocess.Popen(
                        [sys.executable, __file__, str(directory)],
                        cwd=root,
                        env=env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                    ),
                )
            )
        for backend, proc in procs:
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, (
                f"writer under {backend} failed:\n{out.decode()[-3000:]}"
            )
        return directory

    @pytest.mark.parametrize("source", BACKENDS)
    def test_load_and_resume(written, source):
        from keras_custom import hooks

        reference = np.load(written / f"{source}.npz")
        model = keras.models.load_model(written / f"{source}.keras")
        assert [type(h) for h in model.hooks] == [
            hooks.WeightPenalty,
            hooks.SkipNonFinite,
            hooks.ClipByGlobalNorm,
            hooks.LogGradNorm,
        ]
        assert model.hooks[0].exclude == ("d2",) or list(model.hooks[0].exclude) == ["d2"]
        assert model.hooks[1].max_consecutive == 3
        assert int(model.optimizer.iterations) == int(reference["iterations"]) == 5
        # Hook state as saved: the changed strength and the skip counter.
        state = hook_state(model)
        saved = _ordered(reference, "saved_state_")
        assert len(state) == len(saved) > 0
        for got, want in zip(state, saved):
            np.testing.assert_array_equal(got.astype(want.dtype), want)
        assert float(np.asarray(model.hooks[2].strength("max_norm"))) == 0.5
        assert int(np.asarray(model.hooks[1].consecutive)) == 1
        logs = resume(model)
        for got, want in zip(model.get_weights(), _ordered(reference, "weight_")):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(logs["loss"], reference["loss"], rtol=1e-5)
        np.testing.assert_allclose(logs["grad_norm"], reference["grad_norm"], rtol=1e-5)
        for got, want in zip(hook_state(model), _ordered(reference, "final_state_")):
            np.testing.assert_array_equal(got.astype(want.dtype), want)
        assert keras.backend.backend() in BACKENDS

else:
    write(sys.argv[1])
