"""A zero penalty strength costs nothing; a non-zero one stays changeable.

`WeightPenalty(l2=...)` leaves the L1 term (`sum |w|` over every kernel, forward
and backward) out of the compiled step when `l1` is the float 0 at build time.
The step then cannot see a later change, so setting `l1` to a non-zero value
after the build is an error; changing a non-zero strength still works, without
tracing the step again.
"""

import os

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import mlp
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import keras_custom as kc
from keras_custom import hooks
from keras_custom.hooks import clipping
from keras_custom.hooks import penalties

SQUARES = "vdot" if BACKEND == "torch" else "square"


def kernels_of(model):
    return [
        keras.ops.convert_to_numpy(v)
        for v in model.trainable_variables
        if "kernel" in v.path
    ]


def reference(kernels, l1, l2):
    kernels = [np.asarray(k, "float64") for k in kernels]
    return l1 * sum(np.abs(k).sum() for k in kernels) + l2 * sum(
        np.square(k).sum() for k in kernels
    )


class _CountingOps:
    """`keras.ops` with a count of `abs` calls and of the L2 term's
    (`sum_of_squares`: `vdot` on PyTorch, `square` elsewhere)."""

    def __init__(self):
        self.calls = {"abs": 0, SQUARES: 0}

    def __getattr__(self, name):
        attr = getattr(keras.ops, name)
        if name in self.calls:

            def counted(*args, **kwargs):
                self.calls[name] += 1
                return attr(*args, **kwargs)

            return counted
        return attr


def counting(base):
    class Counting(base):
        traces = 0

        def train_step(self, *args):
            type(self).traces += 1
            return super().train_step(*args)

    return Counting


# ------------------------------------------------------------------ the function
finite = st.floats(-10, 10, width=32)


@settings(max_examples=50, deadline=None)
@given(
    w=hnp.arrays(
        "float32", st.tuples(st.integers(1, 4), st.integers(1, 4)), elements=finite
    ),
    l1=st.sampled_from([0.0, 0, 0.25]),
    l2=st.sampled_from([0.0, 0, 0.5]),
)
def test_weight_penalty_with_python_zero_matches_numpy(w, l1, l2):
    got = float(
        penalties.weight_penalty([keras.ops.array(w), keras.ops.array(w.T)], l1, l2)
    )
    want = reference([w, w.T], l1, l2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_python_zero_computes_nothing_tensor_zero_does(monkeypatch):
    spy = _CountingOps()
    monkeypatch.setattr(penalties, "ops", spy)
    monkeypatch.setattr(clipping, "ops", spy)
    w = [keras.ops.ones((2, 2)), keras.ops.ones((3,))]
    assert float(penalties.weight_penalty(w, l1=0.0, l2=0.5)) == pytest.approx(3.5)
    assert spy.calls == {"abs": 0, SQUARES: 2}
    zero = keras.ops.convert_to_tensor(0.0)
    assert float(penalties.weight_penalty(w, l1=zero, l2=0)) == 0.0
    assert spy.calls == {"abs": 2, SQUARES: 2}


# ---------------------------------------------------------------------- the hook
@pytest.mark.parametrize("l1, abs_calls", [(0.0, 0), (0.01, None)])
def test_zero_l1_is_left_out_of_the_step(data, monkeypatch, l1, abs_calls):
    x, y = data
    spy = _CountingOps()
    monkeypatch.setattr(penalties, "ops", spy)
    monkeypatch.setattr(clipping, "ops", spy)
    model = mlp()
    hook = hooks.WeightPenalty(l1=l1, l2=0.1)
    model.compile(keras.optimizers.SGD(0.01), "mse", hooks=[hook])
    before = kernels_of(model)
    logs = model.train_on_batch(x, y, return_dict=True)
    assert hook.is_zero("l1") == (l1 == 0.0)
    assert not hook.is_zero("l2")
    if abs_calls is None:
        assert spy.calls["abs"] > 0
    else:
        assert spy.calls["abs"] == abs_calls
    assert spy.calls[SQUARES] > 0
    np.testing.assert_allclose(
        logs["weight_penalty"], reference(before, l1, 0.1), rtol=1e-5
    )


def test_zero_l1_raised_after_build_takes_effect(data):
    """`l1` was 0 at build (left out of the compiled step); raising it later makes
    the model trace its step again, with the L1 term."""
    x, y = data
    model = mlp()
    hook = hooks.WeightPenalty(l2=0.1)
    hook.l1 = 0.5  # before the build: any valid value
    hook.l1 = 0.0
    model.compile("sgd", "mse", hooks=[hook])
    before = kernels_of(model)
    logs = model.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(
        logs["weight_penalty"], reference(before, 0.0, 0.1), rtol=1e-5
    )
    assert hook.is_zero("l1")
    with pytest.raises(ValueError, match="cannot change from a float to a schedule"):
        hook.l1 = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    assert hook.l1 == 0.0 and hook.is_zero("l1")  # the failed assignment changed nothing
    with pytest.raises(ValueError, match="must be a finite float >= 0"):
        hook.l1 = -1.0
    hook.l1 = 0.3
    assert not hook.is_zero("l1")
    before = kernels_of(model)
    model.reset_metrics()
    logs = model.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(
        logs["weight_penalty"], reference(before, 0.3, 0.1), rtol=1e-5
    )


def test_non_zero_strength_changes_without_a_new_trace(data):
    x, y = data
    cls = counting(kc.Model)
    model = mlp(cls)
    hook = hooks.WeightPenalty(l2=0.1)
    model.compile(keras.optimizers.SGD(0.01), "mse", hooks=[hook])
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    traces = cls.traces
    hook.l2 = 0.7  # a non-zero strength lives in a variable
    hook.l2 = 0.0  # and may even become 0 (the term is still computed)
    logs = model.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    assert logs["weight_penalty"] == 0.0
    hook.l2 = 0.7
    before = kernels_of(model)
    logs = model.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    np.testing.assert_allclose(
        logs["weight_penalty"], reference(before, 0.0, 0.7), rtol=1e-5
    )
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    if BACKEND != "torch":  # eager PyTorch runs `train_step` every batch
        assert cls.traces == traces


def test_zero_strength_after_save_and_load(data, tmp_path):
    x, y = data
    model = mlp()
    model.compile("sgd", "mse", hooks=[hooks.WeightPenalty(l2=0.1)])
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    loaded.train_on_batch(x, y)
    (hook,) = loaded.hooks
    assert hook.is_zero("l1") and not hook.is_zero("l2")
    assert (hook.l1, hook.l2) == (0.0, 0.1)
    hook.l2 = 0.3
    before = kernels_of(loaded)
    logs = loaded.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    np.testing.assert_allclose(
        logs["weight_penalty"], reference(before, 0.0, 0.3), rtol=1e-5
    )
