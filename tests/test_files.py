"""What a `.keras` file of ours holds: Keras's own classes, our part on the side.

A file saved from `kc.Model`/`kc.Sequential` names Keras's `Functional`/
`Sequential`, so it loads wherever a Keras file loads; where keras_custom is
imported it comes back as ours, with its hooks.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings
import zipfile

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import mlp

import keras_custom as kc
from keras_custom import hooks

ROOT = pathlib.Path(__file__).resolve().parent.parent


def config_of(path):
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read("config.json"))


def sequential():
    keras.utils.set_random_seed(0)
    return kc.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="d1"), keras.layers.Dense(1)]
    )


@pytest.mark.parametrize("kind", ["functional", "sequential"])
def test_a_file_names_the_keras_class(tmp_path, kind):
    model = mlp() if kind == "functional" else sequential()
    model.compile("sgd", "mse", hooks=[hooks.ClipByGlobalNorm(1.0)])
    path = tmp_path / "m.keras"
    model.save(path)
    config = config_of(path)
    if kind == "sequential":
        assert (config["module"], config["class_name"]) == ("keras", "Sequential")
    else:
        assert config["class_name"] == "Functional"
        assert config["module"].startswith("keras")
    assert "keras_custom" not in json.dumps(config["config"])
    assert config["keras_custom"]["class"] == f"keras_custom>{type(model).__name__}"
    restored = keras.models.load_model(path)
    assert type(restored) is type(model)
    assert [type(h) for h in restored.hooks] == [hooks.ClipByGlobalNorm]


def test_cleared_custom_objects_load_the_plain_model(tmp_path):
    """The keras-io saving guide clears the registry, then loads a functional
    model: it must load (as plain Keras does), without its hooks."""
    model = mlp()
    model.compile("sgd", "mse", hooks=[hooks.LogGradNorm()])
    path = tmp_path / "m.keras"
    model.save(path)
    x = np.ones((2, 6), "float32")
    saved = dict(keras.saving.get_custom_objects())
    keras.saving.get_custom_objects().clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            restored = keras.models.load_model(path)
    finally:
        keras.saving.get_custom_objects().update(saved)
    assert any("not registered" in str(w.message) for w in caught)
    assert not isinstance(restored, kc.Model)
    np.testing.assert_array_equal(
        restored.predict(x, verbose=0), model.predict(x, verbose=0)
    )


@keras.saving.register_keras_serializable(package="test_files")
class CustomCompile(kc.Model):
    """A user's subclass that overrides `compile` (as in Keras's own tests)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)


def test_a_custom_compile_is_not_called_at_load_as_in_keras(tmp_path):
    model = CustomCompile()
    model.compile("sgd", "mse")
    model.fit(np.ones((4, 3)), np.ones((4, 1)), verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    with pytest.warns(UserWarning, match="`compile\\(\\)` was not called as part of"):
        restored = keras.models.load_model(path)
    assert isinstance(restored, CustomCompile)
    assert getattr(restored, "optimizer", None) is None  # not compiled


SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoKerasCustom(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "keras_custom" or name.startswith("keras_custom."):
                raise ImportError("keras_custom is not installed here")

    sys.meta_path.insert(0, NoKerasCustom())
    import json, warnings
    import numpy as np
    import keras
    out = {}
    for name in sys.argv[2:]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = keras.models.load_model(f"{sys.argv[1]}/{name}.keras")
        x = np.load(f"{sys.argv[1]}/x.npy")
        np.save(f"{sys.argv[1]}/{name}.out.npy", model.predict(x, verbose=0))
        out[name] = [type(model).__name__, [str(w.message)[:200] for w in caught]]
    print(json.dumps(out))
    """
)


def test_files_load_where_keras_custom_is_not_installed(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 4)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    models = {}
    models["sequential"] = sequential()
    inputs = keras.Input((4,))
    models["functional"] = kc.Model(inputs, keras.layers.Dense(2)(inputs))
    attached = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    models["attached"] = kc.attach(attached, [hooks.SkipNonFinite()])
    for name, model in models.items():
        model.compile(
            "adam",
            "mse",
            hooks=[hooks.ClipByGlobalNorm(1.0), hooks.GradientNoise(seed=1)],
        )
        model.fit(x, np.ones((5, model.output_shape[-1])), verbose=0)
        model.save(tmp_path / f"{name}.keras")
    env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ""  # keras_custom is importable from ROOT only through it
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), *models],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for name, model in models.items():
        assert report[name][0] == {
            "sequential": "Sequential",
            "attached": "Sequential",
        }.get(name, "Functional")
        np.testing.assert_array_equal(
            np.load(tmp_path / f"{name}.out.npy"), model.predict(x, verbose=0)
        )
