"""Parameter groups: ScaleGradients, LayerwiseDecay, GradientCentralization.

Each against a NumPy reference over several steps (closed-form gradients of small
linear models, Keras's SGD/Adam/AdamW formulas); composed with clipping in both
orders; under gradient accumulation; a factor changed from a callback without a
new trace; resume == uninterrupted, bitwise; bad input.
"""

import re

import keras
import numpy as np
import pytest
from conftest import only_backends
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import keras_custom as kc
from keras_custom import hooks

npv = keras.ops.convert_to_numpy
finite32 = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)


# ------------------------------------------------------------ pure functions
@settings(max_examples=40, deadline=None)
@given(
    hnp.array_shapes(max_dims=3, max_side=4).flatmap(
        lambda s: st.tuples(
            hnp.arrays("float32", s, elements=finite32),
            hnp.arrays("float32", s, elements=finite32),
        )
    ),
    st.floats(0.0, 4.0, width=32),
)
def test_scale_gradients_and_updates_match_numpy(pair, factor):
    old, new = pair
    f = np.float32(factor)
    (scaled,) = hooks.scale_gradients([new], [factor])
    # (atol: a product below float32's normal range may be flushed to zero)
    np.testing.assert_allclose(npv(scaled), new * f, rtol=1e-6, atol=1e-37)
    (moved,) = hooks.scale_updates([old], [new], [factor])
    np.testing.assert_allclose(npv(moved), old + f * (new - old), rtol=1e-6, atol=1e-3)
    (frozen,) = hooks.scale_updates([old], [new], [0.0])
    np.testing.assert_array_equal(npv(frozen), old)
    assert hooks.scale_updates([old], [new], [None])[0] is new
    assert hooks.scale_gradients([None, new], [2.0, None])[0] is None


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(
        "float32",
        hnp.array_shapes(min_dims=1, max_dims=4, max_side=4),
        elements=st.floats(-100, 100, width=32, allow_subnormal=False),
    )
)
def test_centralize_gradients_matches_numpy(g):
    (out,) = hooks.centralize_gradients([g])
    out = npv(out)
    if g.ndim < 2:
        np.testing.assert_array_equal(out, g)
        return
    axes = tuple(range(g.ndim - 1))
    np.testing.assert_allclose(out, g - g.mean(axis=axes, keepdims=True), atol=1e-4)
    np.testing.assert_allclose(out.mean(axis=axes), 0.0, atol=1e-4)
    (twice,) = hooks.centralize_gradients([out])  # a projection: idempotent
    np.testing.assert_allclose(npv(twice), out, atol=1e-4)


# ------------------------------------------------------------------ helpers
NAMES = ("low", "mid", "top")  # no name inside another path


def branches(seed=0):
    """Three Dense(1) branches on the same input, added: closed-form gradients."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    outs = [keras.layers.Dense(1, name=n)(inputs) for n in NAMES]
    return kc.Model(inputs, keras.layers.Add()(outs))


def data(steps, size=8, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(steps, size, 4)).astype("float32")
    y = (np.tanh(x @ rng.normal(size=(4, 1))) * 3.0 + 1.0).astype("float32")
    return list(zip(x, y))


def params_of(model):
    return {
        n: [npv(v).astype("float64") for v in model.get_layer(n).weights] for n in NAMES
    }


def branch_grads(params, x, y):
    """Gradients of mean((sum_i x W_i + b_i - y)^2) for each branch."""
    r = sum(x @ w + b for w, b in params.values()) - y
    gw, gb = 2.0 / len(x) * x.T @ r, 2.0 / len(x) * r.sum(axis=0)
    return {n: [gw.copy(), gb.copy()] for n in params}


class NumpyAdam:
    """Keras's Adam/AdamW update, per tensor (`lr` may differ per group)."""

    def __init__(self, b1=0.9, b2=0.999, eps=1e-7, weight_decay=0.0):
        self.b1, self.b2, self.eps, self.wd = b1, b2, eps, weight_decay
        self.m, self.v = {}, {}

    def step(self, key, w, g, lr, t):
        m = self.m.get(key, np.zeros_like(w))
        v = self.v.get(key, np.zeros_like(w))
        w = w - w * self.wd * lr
        alpha = lr * np.sqrt(1 - self.b2 ** (t + 1)) / (1 - self.b1 ** (t + 1))
        m = m + (g - m) * (1 - self.b1)
        v = v + (g * g - v) * (1 - self.b2)
        self.m[key], self.v[key] = m, v
        return w - alpha * m / (np.sqrt(v) + self.eps)


def train(model, batches):
    for x, y in batches:
        model.train_on_batch(x, y)


def assert_params(model, expected, rtol=1e-5, atol=1e-6):
    got = params_of(model)
    for name in NAMES:
        for a, b in zip(got[name], expected[name]):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)


# ------------------------------------------------------- ScaleGradients
def test_update_mode_is_a_per_group_learning_rate_with_adamw():
    """The update of each group is that of AdamW with the group's learning rate
    (decoupled weight decay included); a schedule factor; a stop_step window."""
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [1.0, 0.25])
    hook = hooks.ScaleGradients({"low": 0.1, "mid": schedule}, stop_step=5)
    model = branches()
    params = params_of(model)
    lr, wd = 0.05, 0.1
    model.compile(keras.optimizers.AdamW(lr, weight_decay=wd), "mse", hooks=[hook])
    batches = data(6)
    train(model, batches)
    assert hook.groups == {
        "low": ["low/kernel", "low/bias"],
        "mid": ["mid/kernel", "mid/bias"],
    }

    adam = NumpyAdam(weight_decay=wd)
    for t, (x, y) in enumerate(batches):
        grads = branch_grads(params, x, y)
        factors = {"low": 0.1, "mid": 1.0 if t <= 2 else 0.25, "top": 1.0}
        if t >= 5:  # outside the window: every group at the optimizer's rate
            factors = dict.fromkeys(NAMES, 1.0)
        params = {
            n: [
                adam.step((n, i), w, g, lr * factors[n], t)
                for i, (w, g) in enumerate(zip(params[n], grads[n]))
            ]
            for n in NAMES
        }
    assert_params(model, params)


def sgd_momentum_reference(batches, params, lr, factors, momentum=0.9):
    velocity = {}
    for x, y in batches:
        grads = branch_grads(params, x, y)
        for n in NAMES:
            for i in range(2):
                v = velocity.get((n, i), 0.0)
                v = momentum * v - lr * factors.get(n, 1.0) * grads[n][i]
                velocity[(n, i)] = v
                params[n][i] = params[n][i] + v
    return params


def test_gradient_mode_is_a_learning_rate_for_sgd_and_adam_cancels_it():
    batches = data(4)
    model = branches()
    start = params_of(model)
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        "mse",
        hooks=[hooks.ScaleGradients({"low": 0.2, "top": 3.0}, mode="gradient")],
    )
    train(model, batches)
    expected = sgd_momentum_reference(
        batches, {n: list(p) for n, p in start.items()}, 0.05, {"low": 0.2, "top": 3.0}
    )
    assert_params(model, expected)

    # With Adam, a constant gradient factor cancels (up to epsilon): the run is
    # the unscaled one. That is why the default mode scales the update.
    model = branches()
    model.compile(
        keras.optimizers.Adam(0.05),
        "mse",
        hooks=[hooks.ScaleGradients({"low": 0.2, "top": 3.0}, mode="gradient")],
    )
    train(model, batches)
    params, adam = {n: list(p) for n, p in start.items()}, NumpyAdam()
    for t, (x, y) in enumerate(batches):
        grads = branch_grads(params, x, y)
        params = {
            n: [
                adam.step((n, i), w, g, 0.05, t)
                for i, (w, g) in enumerate(zip(params[n], grads[n]))
            ]
            for n in NAMES
        }
    assert_params(model, params, rtol=1e-4, atol=1e-5)


def clip(grads, max_norm):
    norm = np.sqrt(sum(np.sum(g * g) for gs in grads.values() for g in gs))
    factor = max_norm / max(norm, max_norm)
    return {n: [g * factor for g in gs] for n, gs in grads.items()}, norm


@pytest.mark.parametrize(
    "order, mode",
    [("scale_first", "gradient"), ("clip_first", "gradient"), ("scale_first", "update")],
)
def test_composes_with_clipping_in_list_order(order, mode):
    max_norm, lr, factors = 0.5, 0.1, {"low": 0.1}
    scale = hooks.ScaleGradients(factors, mode=mode)
    clipper = hooks.ClipByGlobalNorm(max_norm)
    model = branches()
    params = params_of(model)
    model.compile(
        keras.optimizers.SGD(lr),
        "mse",
        hooks=[scale, clipper] if order == "scale_first" else [clipper, scale],
    )
    batches = data(4)
    train(model, batches)
    bites = []
    for x, y in batches:
        grads = branch_grads(params, x, y)
        if mode == "gradient" and order == "scale_first":
            grads["low"] = [g * factors["low"] for g in grads["low"]]
            grads, norm = clip(grads, max_norm)
        else:  # clip the gradient as computed, then scale (gradient or update)
            grads, norm = clip(grads, max_norm)
            grads["low"] = [g * factors["low"] for g in grads["low"]]
        bites.append(norm > max_norm)
        params = {n: [w - lr * g for w, g in zip(params[n], grads[n])] for n in NAMES}
    assert all(bites)  # the clip acted at every step
    assert_params(model, params)


def test_accumulation_scales_the_update_of_the_mean_gradient():
    model = branches()
    params = params_of(model)
    model.compile(
        keras.optimizers.SGD(0.1, gradient_accumulation_steps=2),
        "mse",
        hooks=[hooks.GradientCentralization(), hooks.ScaleGradients({"mid": 0.5})],
    )
    batches = data(6)
    train(model, batches)
    assert int(npv(model.optimizer.iterations)) == 3
    for first, second in zip(batches[0::2], batches[1::2]):
        g1, g2 = branch_grads(params, *first), branch_grads(params, *second)
        for n in NAMES:
            factor = 0.5 if n == "mid" else 1.0
            gw = (g1[n][0] + g2[n][0]) / 2
            gw = gw - gw.mean(axis=0, keepdims=True)  # centralized kernel (4, 1)
            gb = (g1[n][1] + g2[n][1]) / 2
            params[n] = [
                params[n][0] - 0.1 * factor * gw,
                params[n][1] - 0.1 * factor * gb,
            ]
    assert_params(model, params)


# -------------------------------------------------- changed from a callback
def counting(base):
    class Counting(base):
        traces = 0

        def train_step(self, *args):  # Python runs only while tracing
            type(self).traces += 1
            return super().train_step(*args)

    return Counting


@only_backends("tensorflow", "jax")  # torch runs the step in Python every time
def test_set_factor_from_a_callback_takes_effect_without_a_new_trace():
    x = np.concatenate([b[0] for b in data(4)])
    y = np.concatenate([b[1] for b in data(4)])

    def run(cls, hooks_, callbacks=()):
        cls = counting(cls)
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        outs = [keras.layers.Dense(1, name=n)(inputs) for n in NAMES]
        model = cls(inputs, keras.layers.Add()(outs))
        kwargs = {} if hooks_ is None else {"hooks": hooks_}
        model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=True, **kwargs)
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=3,
            shuffle=False,
            verbose=0,
            callbacks=list(callbacks),
        )
        return cls.traces, model

    plain, _ = run(keras.Model, None)
    hook = hooks.ScaleGradients({"low": 1.0})
    seen = []

    class Schedule(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            hook.set_factor("low", [1.0, 0.0, 1.0][epoch])
            seen.append(npv(self.model.get_layer("low").kernel).copy())

    traces, model = run(kc.Model, [hook], [Schedule()])
    assert traces == plain
    seen.append(npv(model.get_layer("low").kernel))
    assert not np.array_equal(seen[0], seen[1])
    np.testing.assert_array_equal(seen[1], seen[2])  # factor 0: not moved at all
    assert not np.array_equal(seen[2], seen[3])


# ---------------------------------------------------------- LayerwiseDecay
class Block(keras.layers.Layer):
    """A custom layer holding sublayers: one layer for the decay."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.one = keras.layers.Dense(3, name="one")
        self.two = keras.layers.Dense(3, name="two")

    def call(self, x):
        return self.two(self.one(x))


def test_layer_ids_sequential_functional_nested_and_blocks():
    sequential = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(3),
            keras.layers.Dense(3),
            keras.layers.Dense(1),
        ]
    )
    assert hooks.layer_ids(sequential) == ([0, 0, 1, 1, 2, 2], 2)

    backbone = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(3, name="b1"), Block(name="block")],
        name="backbone",
    )
    inputs = keras.Input((2,))
    hidden = keras.layers.Dropout(0.1)(backbone(inputs))  # no weights: no id
    nested = keras.Model(inputs, keras.layers.Dense(1, name="head")(hidden))
    ids, depth = hooks.layer_ids(nested)
    paths = [v.path for v in nested.trainable_variables]
    assert dict(zip(paths, ids)) == {
        "backbone/b1/kernel": 0,
        "backbone/b1/bias": 0,
        "backbone/block/one/kernel": 1,
        "backbone/block/one/bias": 1,
        "backbone/block/two/kernel": 1,
        "backbone/block/two/bias": 1,
        "head/kernel": 2,
        "head/bias": 2,
    }
    assert depth == 2

    inputs = keras.Input((2,))
    h = keras.layers.Dense(3, name="token_embedding")(inputs)
    for i in range(3):
        h = keras.layers.Dense(3, name=f"transformer_layer_{i}")(h)
    h = keras.layers.LayerNormalization(name="final_norm")(h)
    hub_like = keras.Model(inputs, keras.layers.Dense(1, name="head")(h))
    ids, depth = hooks.layer_ids(hub_like)
    by_layer = {
        v.path.split("/")[0]: i for v, i in zip(hub_like.trainable_variables, ids)
    }
    assert by_layer == {
        "token_embedding": 0,
        "transformer_layer_0": 1,
        "transformer_layer_1": 2,
        "transformer_layer_2": 3,
        "final_norm": 4,
        "head": 4,
    }
    assert depth == 4  # L + 1 for L = 3 blocks, BEiT's numbering

    # Your own block names: the first group is the block index.
    inputs = keras.Input((2,))
    h = keras.layers.Dense(3, name="stem")(inputs)
    h = keras.layers.Dense(3, name="stage_1")(keras.layers.Dense(3, name="stage_0")(h))
    staged = keras.Model(inputs, h)
    ids, depth = hooks.layer_ids(staged, block_pattern=r"stage_(\d+)")
    assert (ids, depth) == ([0, 0, 1, 1, 2, 2], 3)  # nothing after the blocks
    with pytest.raises(ValueError, match=r"must capture the block index \(digits\)"):
        hooks.layer_ids(nested, block_pattern=r"block/(one|two)")
    with pytest.raises(ValueError, match=r"LayerwiseDecay: the `block_pattern` 'stage_"):
        hooks.layer_ids(nested, block_pattern=r"stage_(\d+)")


def test_layerwise_decay_matches_numpy_adam_per_layer():
    """Branches a, b, c are layers 0, 1, 2: factors decay**2, decay, 1."""
    decay, lr = 0.5, 0.05
    hook = hooks.LayerwiseDecay(decay)
    model = branches()
    params = params_of(model)
    model.compile(keras.optimizers.Adam(lr), "mse", hooks=[hook])
    batches = data(5)
    train(model, batches)
    assert hook.depth == 2
    assert hook.factors() == {
        "low/kernel": 0.25,
        "low/bias": 0.25,
        "mid/kernel": 0.5,
        "mid/bias": 0.5,
        "top/kernel": 1.0,
        "top/bias": 1.0,
    }
    factors = {"low": decay**2, "mid": decay, "top": 1.0}
    adam = NumpyAdam()
    for t, (x, y) in enumerate(batches):
        grads = branch_grads(params, x, y)
        params = {
            n: [
                adam.step((n, i), w, g, lr * factors[n], t)
                for i, (w, g) in enumerate(zip(params[n], grads[n]))
            ]
            for n in NAMES
        }
    assert_params(model, params)


# -------------------------------------------------- GradientCentralization
def test_gradient_centralization_matches_numpy_sgd():
    """y = (x W1 + b1) W2 + b2: both kernels centralized, biases not."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3, name="hidden")(inputs)
    model = kc.Model(inputs, keras.layers.Dense(1, name="out")(hidden))
    w1, b1, w2, b2 = (npv(v).astype("float64") for v in model.trainable_variables)
    hook = hooks.GradientCentralization()
    model.compile(keras.optimizers.SGD(0.1), "mse", hooks=[hook])
    batches = data(4)
    train(model, batches)
    assert hook.centralized_paths == ["hidden/kernel", "out/kernel"]
    for x, y in batches:
        h = x @ w1 + b1
        dy = 2.0 / len(x) * (h @ w2 + b2 - y)
        gw2, gb2 = h.T @ dy, dy.sum(axis=0)
        dh = dy @ w2.T
        gw1, gb1 = x.T @ dh, dh.sum(axis=0)
        gw1 = gw1 - gw1.mean(axis=0, keepdims=True)
        gw2 = gw2 - gw2.mean(axis=0, keepdims=True)
        w1, b1, w2, b2 = w1 - 0.1 * gw1, b1 - 0.1 * gb1, w2 - 0.1 * gw2, b2 - 0.1 * gb2
    for got, want in zip(model.trainable_variables, (w1, b1, w2, b2)):
        np.testing.assert_allclose(npv(got), want, rtol=1e-5, atol=1e-6)


def test_gradient_centralization_selection():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(10, 4, name="embed")(inputs)
    h = keras.layers.Conv1D(3, 2, name="conv")(h)
    h = keras.layers.Flatten()(h)
    model = kc.Model(inputs, keras.layers.Dense(1, name="head")(h))
    hook = hooks.GradientCentralization(exclude="head")
    model.compile("sgd", "mse", hooks=[hook])
    assert hook.centralized_paths == ["conv/kernel"]  # not embeddings, biases, head
    with pytest.raises(ValueError, match=r"matches only variables of rank < 2"):
        model.compile("sgd", "mse", hooks=[hooks.GradientCentralization(include="bias")])
    with pytest.raises(ValueError, match=r"`include` pattern 'encoder' matches no"):
        model.compile(
            "sgd", "mse", hooks=[hooks.GradientCentralization(include="encoder")]
        )
    assert model.hooks == [hook]  # a failed compile keeps the model as it was
    hook = hooks.GradientCentralization(include="embed")
    model.compile("sgd", "mse", hooks=[hook])
    assert hook.centralized_paths == ["embed/embeddings"]


# ------------------------------------------------------- saving, resuming
def test_resume_equals_uninterrupted_bitwise(tmp_path):
    """Epoch 1 at factor 0.3, then 0.4 (set between the epochs); one run saves and
    reloads in between."""
    x = np.concatenate([b[0] for b in data(4)])
    y = np.concatenate([b[1] for b in data(4)])
    schedule = keras.optimizers.schedules.ExponentialDecay(1.0, 4, 0.5)

    def first_epoch():
        model = branches()
        model.compile(
            keras.optimizers.Adam(0.05),
            "mse",
            hooks=[
                hooks.GradientCentralization(),
                hooks.ScaleGradients({"low": 0.3, "mid/bias": schedule}),
                hooks.LayerwiseDecay(0.7),
            ],
        )
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        model.hooks[1].set_factor("low", 0.4)
        return model

    straight = first_epoch()
    straight.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    first = first_epoch()
    first.save(tmp_path / "groups.keras")
    resumed = keras.models.load_model(tmp_path / "groups.keras")
    assert [h.get_config() for h in resumed.hooks] == [
        h.get_config() for h in first.hooks
    ]
    assert resumed.hooks[1].factors["low"] == 0.4
    assert isinstance(resumed.hooks[1].factors["mid/bias"], type(schedule))
    resumed.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    got = resumed.get_weights() + [npv(v) for h in resumed.hooks for v in h.variables]
    want = straight.get_weights() + [npv(v) for h in straight.hooks for v in h.variables]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "make, error, text",
    [
        (
            lambda: hooks.ScaleGradients({}),
            ValueError,
            "ScaleGradients: `factors` must be a non-empty dict {pattern: factor}. "
            "Received: factors={}",
        ),
        (
            lambda: hooks.ScaleGradients([("low", 1.0)]),
            ValueError,
            "factors=[('low', 1.0)]",
        ),
        (
            lambda: hooks.ScaleGradients({"low": -0.5}),
            ValueError,
            "ScaleGradients: `factors['low']` must be a finite float >= 0. "
            "Received: factors['low']=-0.5",
        ),
        (lambda: hooks.ScaleGradients({"low": "x"}), TypeError, "factors['low']='x'"),
        (
            lambda: hooks.ScaleGradients({"(": 1.0}),
            ValueError,
            "ScaleGradients: `factors` has an invalid regular expression '('",
        ),
        (
            lambda: hooks.ScaleGradients({3: 1.0}),
            TypeError,
            "ScaleGradients: the keys of `factors` must be regular expressions "
            "(strings) searched in `variable.path`. Received: factors={3: 1.0}",
        ),
        (
            lambda: hooks.ScaleGradients({"low": 1.0}, mode="lr"),
            ValueError,
            "ScaleGradients: `mode` must be one of ['gradient', 'update']. Received: mode='lr'",
        ),
        (
            lambda: hooks.LayerwiseDecay(1.5),
            ValueError,
            "LayerwiseDecay: `decay` must be a float in (0, 1] or a "
            "keras.optimizers.schedules.LearningRateSchedule. Received: decay=1.5",
        ),
        (lambda: hooks.LayerwiseDecay(0.0), ValueError, "decay=0.0"),
        (
            lambda: hooks.LayerwiseDecay(block_pattern="block"),
            ValueError,
            "LayerwiseDecay: `block_pattern` must have a group capturing the block index",
        ),
        (
            lambda: hooks.GradientCentralization(include=[]),
            ValueError,
            "GradientCentralization: `include` must be a regular expression",
        ),
    ],
)
def test_bad_arguments(make, error, text):
    with pytest.raises(error, match=re.escape(text)):
        make()


def test_patterns_are_checked_when_the_hook_is_built():
    model = branches()
    model.compile("sgd", "mse", hooks=[hooks.LogGradNorm()])
    with pytest.raises(
        ValueError, match="ScaleGradients: the pattern 'encoder' matches no"
    ):
        model.compile("sgd", "mse", hooks=[hooks.ScaleGradients({"encoder": 0.1})])
    with pytest.raises(
        ValueError, match=r"the pattern 'low/kernel' matches only variables "
    ):
        model.compile(
            "sgd", "mse", hooks=[hooks.ScaleGradients({"low": 0.1, "low/kernel": 0.0})]
        )
    with pytest.raises(ValueError, match="LayerwiseDecay: the `block_pattern` 'x_"):
        model.compile(
            "sgd", "mse", hooks=[hooks.LayerwiseDecay(block_pattern=r"x_(\d+)")]
        )
    assert [type(h).__name__ for h in model.hooks] == ["LogGradNorm"]
    hook = hooks.ScaleGradients({"low": 0.1})
    model.compile("sgd", "mse", hooks=[hook])
    with pytest.raises(
        ValueError, match=r"'z' is not one of the hook's patterns \['low'\]"
    ):
        hook.set_factor("z", 1.0)
    with pytest.raises(ValueError, match="cannot change between a float and a schedule"):
        hook.set_factor("low", keras.optimizers.schedules.ExponentialDecay(1.0, 2, 0.5))
    with pytest.raises(ValueError, match=re.escape("Received: factors['low']=-1.0")):
        hook.set_factor("low", -1.0)
    assert hook.factors == {"low": 0.1}


@pytest.mark.parametrize(
    "hook",
    [
        hooks.ScaleGradients(
            {"low": 0.5, "mid": keras.optimizers.schedules.ExponentialDecay(1.0, 4, 0.5)},
            mode="gradient",
            start_step=2,
        ),
        hooks.LayerwiseDecay(0.8, block_pattern=r"block_(\d+)", stop_step=9),
        hooks.GradientCentralization(include=["low", "mid"], exclude="mid/bias"),
    ],
    ids=["scale", "layerwise", "centralization"],
)
def test_config_round_trip(hook):
    config = hook.get_config()
    again = type(hook).from_config(config)
    assert again.get_config() == config
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(hook)
    )
    assert type(restored) is type(hook) and restored.get_config() == config
