"""LogUpdateRatio, and hook scalars reaching TensorBoard's event files."""

import re

import keras
import numpy as np
import pytest
from conftest import mlp
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_custom import hooks

npv = keras.ops.convert_to_numpy


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        hnp.arrays(
            np.float32,
            st.integers(1, 6),
            # Norms are float32 sums of squares: magnitudes below ~1e-19 underflow
            # (documented in `global_norm`), so the reference would disagree there.
            elements=st.floats(-4, 4, width=32).filter(
                lambda v: v == 0 or abs(v) > 1e-15
            ),
        ),
        min_size=1,
        max_size=3,
    ),
    st.floats(-0.5, 0.5),
)
def test_update_ratio_matches_numpy(old, shift):
    new = [o + np.float32(shift) * np.arange(o.size, dtype="float32") for o in old]
    num = np.sqrt(sum(np.sum((n.astype(float) - o) ** 2) for o, n in zip(old, new)))
    den = np.sqrt(sum(np.sum(o.astype(float) ** 2) for o in old))
    expected = num / den if den > 0 else 0.0
    got = float(hooks.update_ratio(old, new))
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_zero_weights_give_zero_not_nan():
    assert (
        float(hooks.update_ratio([np.zeros(3, "float32")], [np.ones(3, "float32")])) == 0
    )


def test_logged_ratio_equals_the_weight_change(data):
    x, y = data
    model = mlp()
    model.compile(keras.optimizers.SGD(0.1), "mse", hooks=[hooks.LogUpdateRatio()])
    before = [npv(v).copy() for v in model.trainable_variables]
    logs = model.train_on_batch(x, y, return_dict=True)
    after = [npv(v) for v in model.trainable_variables]
    diff = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(after, before)))
    norm = np.sqrt(sum(np.sum(b**2) for b in before))
    assert logs["update_ratio"] == pytest.approx(diff / norm, rel=1e-4)
    assert logs["update_ratio"] > 0


def test_skipped_step_logs_zero(data):
    x, y = data
    y = y.copy()
    y[0] = np.nan
    model = mlp()
    model.compile(
        "adam", "mse", hooks=[hooks.SkipNonFinite(), hooks.LogUpdateRatio(name="ratio")]
    )
    logs = model.train_on_batch(x, y, return_dict=True)
    assert logs["ratio"] == 0.0 and logs["skipped_steps"] == 1.0


def test_save_load_round_trip(data, tmp_path):
    model = mlp()
    model.compile("adam", "mse", hooks=[hooks.LogUpdateRatio(name="ur", start_step=2)])
    model.fit(*data, epochs=1, verbose=0)
    model.save(tmp_path / "ur.keras")
    restored = keras.models.load_model(tmp_path / "ur.keras")
    (hook,) = restored.hooks
    assert isinstance(hook, hooks.LogUpdateRatio)
    assert hook.get_config() == model.hooks[0].get_config()
    history = restored.fit(*data, epochs=1, verbose=0).history
    assert history["ur"][0] > 0


@pytest.mark.parametrize("name", [3, "", None])
def test_bad_name(name):
    with pytest.raises(TypeError, match=re.escape("LogUpdateRatio: `name`")):
        hooks.LogUpdateRatio(name=name)


# -------------------------------------------------------------- TensorBoard
def read_scalars(log_dir):
    """{tag: [value per step]} from the event files under `log_dir`."""
    import tensorflow as tf

    scalars = {}
    for path in sorted(log_dir.rglob("events.out.tfevents*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.HasField("tensor"):
                    if value.metadata.plugin_data.plugin_name != "scalars":
                        continue  # the model's config, written as text
                    number = float(tf.make_ndarray(value.tensor))
                else:
                    number = float(value.simple_value)
                key = (path.parent.name, value.tag)
                scalars.setdefault(key, []).append((event.step, number))
    return scalars


@pytest.mark.parametrize("jit_compile", [False, True])
def test_hook_scalars_reach_tensorboard(data, tmp_path, jit_compile):
    pytest.importorskip("tensorboard", reason="keras.callbacks.TensorBoard needs it")
    x, y = data
    model = mlp()
    model.compile(
        "adam",
        "mse",
        jit_compile=jit_compile,
        hooks=[
            hooks.WeightPenalty(l2=1e-3),
            hooks.SkipNonFinite(),
            hooks.ClipByGlobalNorm(0.5, log_norms=True),
            hooks.LogGradNorm(),
            hooks.LogUpdateRatio(),
            hooks.LogLearningRate(),
        ],
    )
    history = model.fit(
        x,
        y,
        batch_size=16,
        epochs=3,
        validation_split=0.25,
        verbose=0,
        callbacks=[keras.callbacks.TensorBoard(tmp_path / "tb")],
    ).history
    scalars = read_scalars(tmp_path / "tb")
    names = [
        "update_ratio",
        "grad_norm",
        "learning_rate",
        "skipped_steps",
        "weight_penalty",
        "clip_by_global_norm/norm_before",
        "clip_by_global_norm/norm_after",
    ]
    for name in names:
        points = scalars[("train", f"epoch_{name}")]
        assert [s for s, _ in points] == [0, 1, 2], name
        np.testing.assert_allclose([v for _, v in points], history[name], rtol=1e-6)
    assert [v for _, v in scalars[("train", "epoch_skipped_steps")]] == [0.0, 0.0, 0.0]
    # loss terms are part of the test step too; gradient hooks are not
    assert ("validation", "epoch_weight_penalty") in scalars
    assert ("validation", "epoch_update_ratio") not in scalars
