"""Nothing misread from a file: state loaded into a hook obeys the constructor's
rules and agrees with the hook's configuration, or the file is refused."""

import io
import re
import zipfile

import h5py
import keras
import numpy as np
import pytest
from conftest import mlp

from keras_custom import hooks


def saved_model(tmp_path, hook_list):
    model = mlp()
    model.compile("sgd", "mse", hooks=hook_list)
    model.fit(np.ones((8, 6)), np.ones((8, 1)), verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    return model, path


def rewrite_state(path, entry, value):
    """Writes `value` into the dataset `entry` of the file's weights."""
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    buffer = io.BytesIO(members["model.weights.h5"])
    with h5py.File(buffer, "r+") as f:
        f[entry][...] = value
    members["model.weights.h5"] = buffer.getvalue()
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


@pytest.mark.parametrize(
    "value, message",
    [
        (-1.0, "`max_norm` must be a finite float > 0. Received: max_norm=-1.0"),
        (float("nan"), "Received: max_norm=nan"),
        (float("inf"), "Received: max_norm=inf"),
        (
            0.5,
            "the file's saved state says max_norm=0.5, its configuration says "
            "max_norm=1.0",
        ),
    ],
)
def test_a_bad_saved_strength_is_refused(tmp_path, value, message):
    _, path = saved_model(tmp_path, [hooks.ClipByGlobalNorm(1.0)])
    rewrite_state(path, "hooks/clip_by_global_norm/vars/0", value)
    with pytest.raises(ValueError, match=re.escape(message)):
        keras.models.load_model(path)


def test_bad_guard_counters_are_refused(tmp_path):
    _, path = saved_model(tmp_path, [hooks.SkipNonFinite(max_consecutive=2)])
    rewrite_state(path, "hooks/skip_non_finite/vars/1", 7)  # `tripped`: 0 or 1
    with pytest.raises(ValueError, match=r"SkipNonFinite\(name='skipped_steps'\): the "):
        keras.models.load_model(path)


def test_a_good_file_still_loads(tmp_path):
    model, path = saved_model(tmp_path, [hooks.ClipByGlobalNorm(1.0)])
    model.hooks[0].max_norm = 0.25  # changed during training: config and state agree
    model.save(path)
    restored = keras.models.load_model(path)
    assert restored.hooks[0].max_norm == 0.25
    assert float(restored.hooks[0].strength("max_norm")) == 0.25


def test_a_refused_assignment_changes_nothing(tmp_path):
    clip = hooks.ClipByGlobalNorm(1.0)
    model, path = saved_model(tmp_path, [clip])
    schedule = keras.optimizers.schedules.ExponentialDecay(1.0, 10, 0.5)
    with pytest.raises(ValueError, match="cannot change from a float to a schedule"):
        clip.max_norm = schedule
    with pytest.raises(ValueError, match="must be a finite float > 0"):
        clip.max_norm = -3.0
    assert clip.max_norm == 1.0 and clip.get_config()["max_norm"] == 1.0
    assert float(clip.strength("max_norm")) == 1.0
    model.save(path)
    assert keras.models.load_model(path).hooks[0].max_norm == 1.0
