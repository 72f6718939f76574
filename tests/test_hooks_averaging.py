"""Weight averaging: WeightAverage (EMA, SWA), Lookahead, recompute_batch_norm.

Each hook against a NumPy reference over several steps; skipped steps move
nothing; resume == uninterrupted, bitwise; gradient accumulation; the average
used in `fit` (validation, swap at the end) and in `averaged()`; bad input.
"""

import re
import warnings

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


def arrays(shape):
    return hnp.arrays("float32", shape, elements=finite32)


# ------------------------------------------------------------ pure functions
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6), st.floats(0.0, 0.9999), st.booleans())
def test_ema_decay_matches_formula(count, decay, warmup):
    expected = 0.0 if count == 0 else decay
    if warmup and count > 0:
        expected = min(decay, (1 + count) / (10 + count))
    got = float(hooks.ema_decay(count, decay, warmup))
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)


@settings(max_examples=40, deadline=None)
@given(
    hnp.array_shapes(max_dims=3, max_side=4).flatmap(
        lambda s: st.tuples(arrays(s), arrays(s))
    ),
    st.floats(0.0, 1.0, width=32),
)
def test_moving_average_and_lookahead_step_match_numpy(pair, rate):
    a, b = pair
    rate32 = np.float32(rate)
    (avg,) = hooks.moving_average([a], [b], rate)
    np.testing.assert_allclose(
        npv(avg), rate32 * a + (np.float32(1) - rate32) * b, rtol=1e-6, atol=1e-4
    )
    (slow,) = hooks.lookahead_step([a], [b], rate)
    np.testing.assert_allclose(npv(slow), a + rate32 * (b - a), rtol=1e-6, atol=1e-4)
    (copy,) = hooks.moving_average([a], [b], 0.0)  # the first update copies exactly
    np.testing.assert_array_equal(npv(copy), b)


@settings(max_examples=20, deadline=None)
@given(st.lists(arrays((3,)), min_size=1, max_size=12))
def test_swa_decay_gives_the_equal_weight_mean(values):
    average = np.zeros(3, "float32")
    for n, value in enumerate(values):
        (average,) = hooks.moving_average([average], [value], hooks.swa_decay(n))
    np.testing.assert_allclose(
        npv(average), np.mean(np.stack(values).astype("float64"), axis=0), atol=1e-3
    )


# ------------------------------------------------------------------ helpers
def bn_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    return kc.Model(inputs, keras.layers.Dense(1, name="out")(h))


def linear_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    return kc.Model(inputs, keras.layers.Dense(1, name="lin")(inputs))


def batches(n, features=6, size=8, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, size, features)).astype("float32")
    y = (x.sum(axis=-1, keepdims=True) * 0.5 + 1.0).astype("float32")
    return list(zip(x, y))


def values(variables):
    return [npv(v).copy() for v in variables]


def due_steps(steps, start, every):
    return [s for s in range(steps) if s >= start and (s - start + 1) % every == 0]


def ema_reference(trajectory, due, decay, warmup):
    average = None
    for n, step in enumerate(due):
        weights = [w.astype("float32") for w in trajectory[step]]
        if average is None:
            average = weights
            continue
        d = np.float32(min(decay, (1 + n) / (10 + n)) if warmup else decay)
        average = [d * a + (np.float32(1) - d) * w for a, w in zip(average, weights)]
    return average


# ------------------------------------------------------- against NumPy
def test_ema_with_warmup_window_and_every_matches_numpy():
    """BatchNormalization statistics are averaged too; updates after steps 2, 4, 6."""
    model = bn_model()
    hook = hooks.WeightAverage(decay=0.9, warmup=True, start_step=1, every=2)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse", hooks=[hook])
    trajectory = []
    for x, y in batches(7):
        model.train_on_batch(x, y)
        trajectory.append(values(hook.averaged_variables))
    paths = [v.path for v in hook.averaged_variables]
    assert paths[-2:] == ["bn/moving_mean", "bn/moving_variance"]
    assert len(paths) == len(model.trainable_variables) + 2
    assert hook.count == 3
    expected = ema_reference(trajectory, due_steps(7, 1, 2), 0.9, warmup=True)
    for variable, want in zip(hook.averaged_variables, expected):
        np.testing.assert_allclose(
            npv(hook.average_of(variable)), want, rtol=2e-6, atol=1e-7
        )
    # The average is not simply the last weights.
    assert not np.allclose(expected[0], trajectory[-1][0])


def test_swa_is_the_mean_from_start_step_of_trainable_weights_only():
    model = bn_model()
    hook = hooks.WeightAverage(kind="swa", start_step=2, include_non_trainable=False)
    model.compile(keras.optimizers.SGD(0.05), "mse", hooks=[hook])
    trajectory = []
    for x, y in batches(6):
        model.train_on_batch(x, y)
        trajectory.append(values(hook.averaged_variables))
    assert [v.path for v in hook.averaged_variables] == [
        v.path for v in model.trainable_variables
    ]
    assert hook.count == 4
    for i, variable in enumerate(hook.averaged_variables):
        want = np.mean([trajectory[s][i] for s in range(2, 6)], axis=0)
        np.testing.assert_allclose(
            npv(hook.average_of(variable)), want, rtol=1e-5, atol=1e-6
        )


def linear_sgd_lookahead(x_batches, y_batches, w, b, lr, k, alpha, start):
    """SGD on mean((x w + b - y)^2), with Lookahead from step `start`."""
    w, b = w.astype("float64"), b.astype("float64")
    slow, count = None, 0
    for step, (x, y) in enumerate(zip(x_batches, y_batches)):
        if step == start:
            slow = (w.copy(), b.copy())
        r = x @ w + b - y
        w = w - lr * 2.0 / len(x) * x.T @ r
        b = b - lr * 2.0 / len(x) * r.sum(axis=0)
        if step >= start:
            count += 1
            if count == k:
                slow = (slow[0] + alpha * (w - slow[0]), slow[1] + alpha * (b - slow[1]))
                w, b, count = slow[0].copy(), slow[1].copy(), 0
    return w, b, slow


def test_lookahead_matches_numpy_sgd():
    model = linear_model()
    w0, b0 = (npv(v).copy() for v in model.trainable_variables)
    hook = hooks.Lookahead(k=3, alpha=0.5, start_step=1)
    model.compile(keras.optimizers.SGD(0.05), "mse", hooks=[hook])
    data = batches(8, features=4)
    for x, y in data:
        model.train_on_batch(x, y)
    w, b, slow = linear_sgd_lookahead(
        [x for x, _ in data], [y for _, y in data], w0, b0, 0.05, 3, 0.5, start=1
    )
    kernel, bias = model.trainable_variables
    np.testing.assert_allclose(npv(kernel), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(npv(bias), b, rtol=1e-5, atol=1e-6)
    for got, want in zip(hook.slow_variables, slow):
        np.testing.assert_allclose(npv(got), want, rtol=1e-5, atol=1e-6)
    assert int(npv(hook.variables[-1])) == (8 - 1) % 3  # 7 updates in the window
    # Lookahead acted: plain SGD ends elsewhere.
    plain, _, _ = linear_sgd_lookahead(
        [x for x, _ in data], [y for _, y in data], w0, b0, 0.05, 1, 1.0, start=0
    )
    assert not np.allclose(w, plain, rtol=1e-3)


# -------------------------------------------------------- nothing moves
def test_a_skipped_step_moves_no_average_and_no_slow_weight():
    def run(data):
        model = bn_model()
        model.compile(
            keras.optimizers.Adam(0.01),
            "mse",
            hooks=[
                hooks.SkipNonFinite(),
                hooks.Lookahead(k=2, alpha=0.5),
                hooks.WeightAverage(decay=0.8, every=2),
                hooks.WeightAverage(kind="swa", name="swa"),
            ],
        )
        for x, y in data:
            model.train_on_batch(x, y)
        state = [v for h in model.hooks[1:] for v in h.variables]
        return values(model.weights + model.optimizer.variables + state)

    data = batches(5)
    bad = (np.full_like(data[0][0], np.nan), data[0][1])
    clean = run(data)
    with_nan = run(data[:2] + [bad] + data[2:])  # the NaN batch in mid-cycle
    assert len(clean) == len(with_nan)
    for a, b in zip(clean, with_nan):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------- saving, resuming
def recipe_hooks():
    return [
        hooks.Lookahead(k=3, alpha=0.6),
        hooks.WeightAverage(decay=0.95, name="ema"),
        hooks.WeightAverage(kind="swa", start_step=2, every=2, name="swa"),
    ]


def test_resume_equals_uninterrupted_bitwise(tmp_path):
    x = np.concatenate([b[0] for b in batches(5)])
    y = np.concatenate([b[1] for b in batches(5)])

    def fitted(epochs):
        model = bn_model()
        model.compile(keras.optimizers.Adam(0.01), "mse", hooks=recipe_hooks())
        model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)
        return model

    straight = fitted(2)
    first = fitted(1)
    first.save(tmp_path / "recipes.keras")
    resumed = keras.models.load_model(tmp_path / "recipes.keras")
    assert [h.get_config() for h in resumed.hooks] == [
        h.get_config() for h in first.hooks
    ]
    resumed.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert resumed.hooks[1].count == straight.hooks[1].count == 10
    assert resumed.hooks[2].count == straight.hooks[2].count == 4
    for model in (resumed, straight):
        assert int(npv(model.hooks[0].variables[-1])) == 10 % 3
    got = values(resumed.weights + [v for h in resumed.hooks for v in h.variables])
    want = values(straight.weights + [v for h in straight.hooks for v in h.variables])
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------- gradient accumulation
def test_under_accumulation_the_average_sees_each_real_update_once():
    model = bn_model()
    hook = hooks.WeightAverage(decay=0.7, warmup=False)
    lookahead = hooks.Lookahead(k=2)
    optimizer = keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
    model.compile(optimizer, "mse", hooks=[lookahead, hook])
    trajectory = []
    for i, (x, y) in enumerate(batches(6)):
        model.train_on_batch(x, y)
        if i % 2 == 1:  # an update every second batch
            trajectory.append(values(hook.averaged_variables))
    assert int(npv(model.optimizer.iterations)) == 3
    assert hook.count == 3
    assert int(npv(lookahead.variables[-1])) == 3 % 2
    expected = ema_reference(trajectory, [0, 1, 2], 0.7, warmup=False)
    for variable, want in zip(hook.averaged_variables, expected):
        np.testing.assert_allclose(
            npv(hook.average_of(variable)), want, rtol=2e-6, atol=1e-7
        )


# ----------------------------------------------- using the average in fit
def test_validate_with_average_swap_at_end_and_averaged_context():
    data = batches(4)
    x = np.concatenate([b[0] for b in data])
    y = np.concatenate([b[1] for b in data])
    x_val, y_val = x[:16] * 1.5, y[:16]
    validated = hooks.WeightAverage(decay=0.9, validate_with_average=True, name="val")
    swapped = hooks.WeightAverage(kind="swa", swap_at_end=True, name="swapped")
    model = bn_model()
    model.compile(keras.optimizers.SGD(0.1), "mse", hooks=[validated, swapped])
    callbacks = keras.callbacks.CallbackList([], add_history=True, model=model)
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        validation_data=(x_val, y_val),
        callbacks=callbacks,
        shuffle=False,
        verbose=0,
    ).history
    # The end of fit swapped the SWA average in, for good.
    for variable in swapped.averaged_variables:
        np.testing.assert_array_equal(npv(variable), npv(swapped.average_of(variable)))
    # Validation used the EMA average: evaluating with it gives val_loss.
    raw = values(model.weights)
    with validated.averaged(model) as same:
        assert same is model
        averaged_loss = model.evaluate(x_val, y_val, verbose=0)
        np.testing.assert_array_equal(
            npv(model.trainable_variables[0]),
            npv(validated.average_of(model.trainable_variables[0])),
        )
    for a, b in zip(values(model.weights), raw):  # put back bit-identical
        np.testing.assert_array_equal(a, b)
    assert history["val_loss"][-1] == pytest.approx(averaged_loss, rel=1e-6)
    assert model.evaluate(x_val, y_val, verbose=0) != pytest.approx(averaged_loss)
    # A CallbackList reused by a second fit gets each hook callback once; training
    # on after the swap works (on JAX the swapped buffers are not shared).
    model.fit(x, y, batch_size=8, epochs=1, callbacks=callbacks, verbose=0)
    kinds = [type(c).__name__ for c in callbacks.callbacks]
    assert kinds.count("_UseAverage") == 2


def test_nothing_averaged_yet():
    model = bn_model()
    hook = hooks.WeightAverage(start_step=100, swap_at_end=True)
    model.compile("sgd", "mse", hooks=[hook])
    x, y = batches(1)[0]
    before = values(model.weights)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        model.fit(x, y, verbose=0)
    assert any("nothing was averaged during `fit`" in str(w.message) for w in caught)
    assert hook.count == 0
    trained = values(model.weights)
    with hook.averaged(model):  # nothing to swap in: the model's own weights
        for a, b in zip(values(model.weights), trained):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"assign_average: nothing has been averaged"):
        hook.assign_average(model)
    assert not np.array_equal(before[0], npv(model.weights[0]))  # it did train
    other = bn_model()
    other.compile("sgd", "mse")
    with pytest.raises(ValueError, match="must be the model this hook is compiled with"):
        with hook.averaged(other):
            pass


@only_backends("tensorflow", "jax")  # torch runs the step in Python every time
def test_no_more_traces_than_plain_keras():
    x = np.concatenate([b[0] for b in batches(4)])
    y = np.concatenate([b[1] for b in batches(4)])

    def traces(base, hooks_=None):
        class Counting(base):
            count = 0

            def train_step(self, *args):  # Python runs only while tracing
                type(self).count += 1
                return super().train_step(*args)

        keras.utils.set_random_seed(0)
        model = Counting(
            [keras.Input((6,)), keras.layers.Dense(4), keras.layers.Dense(1)]
        )
        kwargs = {} if hooks_ is None else {"hooks": hooks_}
        model.compile("adam", "mse", jit_compile=True, **kwargs)
        model.fit(x, y, batch_size=8, epochs=3, validation_data=(x, y), verbose=0)
        return Counting.count

    hooks_ = [
        hooks.Lookahead(k=3),
        hooks.WeightAverage(start_step=3, every=2, validate_with_average=True),
    ]
    assert traces(kc.Sequential, hooks_) == traces(keras.Sequential)


# ------------------------------------------------- BatchNormalization
def test_recompute_batch_norm_gives_the_mean_of_batch_statistics():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    normed = keras.layers.BatchNormalization(name="bn", momentum=0.9)(inputs)
    frozen = keras.layers.BatchNormalization(name="frozen")
    frozen.trainable = False
    model = kc.Model(inputs, keras.layers.Dense(1)(frozen(normed)))
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(40, 3)) * [1.0, 2.0, 3.0] + [5.0, -1.0, 0.0]).astype("float32")
    frozen_before = values(frozen.weights)
    dense_before = values(model.trainable_variables)
    used = hooks.recompute_batch_norm(model, x, batch_size=16)  # 16, 16, 8
    assert used == 3
    parts = [x[:16], x[16:32], x[32:]]
    bn = model.get_layer("bn")
    np.testing.assert_allclose(
        npv(bn.moving_mean), np.mean([p.mean(0) for p in parts], 0), rtol=1e-5
    )
    np.testing.assert_allclose(
        npv(bn.moving_variance), np.mean([p.var(0) for p in parts], 0), rtol=1e-5
    )
    assert bn.momentum == 0.9  # restored
    for a, b in zip(values(frozen.weights), frozen_before):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(values(model.trainable_variables), dense_before):
        np.testing.assert_array_equal(a, b)
    # An iterable of (x, y) batches, stopped after two.
    stream = ((p, np.zeros((len(p), 1), "float32")) for p in parts)
    assert hooks.recompute_batch_norm(model, stream, steps=2) == 2
    np.testing.assert_allclose(
        npv(bn.moving_mean), np.mean([p.mean(0) for p in parts[:2]], 0), rtol=1e-5
    )


def test_recompute_batch_norm_bad_input():
    model = linear_model()
    with pytest.raises(ValueError, match="has no BatchNormalization layer"):
        hooks.recompute_batch_norm(model, np.ones((4, 4), "float32"))
    model = bn_model()
    with pytest.raises(ValueError, match=r"`x` holds no batch"):
        hooks.recompute_batch_norm(model, iter([]))
    with pytest.raises(ValueError, match=r"`batch_size` must be an integer >= 1"):
        hooks.recompute_batch_norm(model, np.ones((4, 6)), batch_size=0)


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "make, error, text",
    [
        (
            lambda: hooks.WeightAverage(decay=1.5),
            ValueError,
            "WeightAverage: `decay` must be a float in [0, 1). Received: decay=1.5",
        ),
        (lambda: hooks.WeightAverage(decay=1.0), ValueError, "decay=1.0"),
        (lambda: hooks.WeightAverage(decay="0.9"), TypeError, "decay='0.9'"),
        (
            lambda: hooks.WeightAverage(kind="sma"),
            ValueError,
            "WeightAverage: `kind` must be one of ['ema', 'swa']. Received: kind='sma'",
        ),
        (
            lambda: hooks.WeightAverage(kind="swa", decay=0.9),
            ValueError,
            "WeightAverage: `decay` and `warmup` set the exponential average",
        ),
        (
            lambda: hooks.WeightAverage(every=0),
            ValueError,
            "WeightAverage: `every` must be an integer >= 1. Received: every=0",
        ),
        (
            lambda: hooks.WeightAverage(every=2**40),
            ValueError,
            "WeightAverage: `every` must be at most 2147483647",
        ),
        (
            lambda: hooks.WeightAverage(warmup=1),
            TypeError,
            "WeightAverage: `warmup` must be a bool. Received: warmup=1",
        ),
        (
            lambda: hooks.WeightAverage(swap_at_end="yes"),
            TypeError,
            "`swap_at_end` must be a bool. Received: swap_at_end='yes'",
        ),
        (
            lambda: hooks.WeightAverage(start_step=3, stop_step=2),
            ValueError,
            "WeightAverage: `stop_step` must be greater than `start_step`",
        ),
        (
            lambda: hooks.Lookahead(k=0),
            ValueError,
            "Lookahead: `k` must be an integer >= 1. Received: k=0",
        ),
        (
            lambda: hooks.Lookahead(alpha=0.0),
            ValueError,
            "Lookahead: `alpha` must be a float in (0, 1]. Received: alpha=0.0",
        ),
        (lambda: hooks.Lookahead(alpha=float("nan")), ValueError, "alpha=nan"),
        (lambda: hooks.Lookahead(k=2.5), ValueError, "k=2.5"),
    ],
)
def test_bad_arguments(make, error, text):
    with pytest.raises(error, match=re.escape(text)):
        make()


@pytest.mark.parametrize(
    "hook",
    [
        hooks.WeightAverage(
            decay=0.99, warmup=False, every=3, start_step=4, validate_with_average=True
        ),
        hooks.WeightAverage(kind="swa", include_non_trainable=False, swap_at_end=True),
        hooks.Lookahead(k=7, alpha=0.8, stop_step=100),
    ],
    ids=["ema", "swa", "lookahead"],
)
def test_config_round_trip(hook):
    config = hook.get_config()
    assert type(hook).from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(hook)
    )
    assert type(restored) is type(hook) and restored.get_config() == config


def test_saved_state_that_breaks_the_rules_is_refused(tmp_path):
    model = linear_model()
    model.compile("sgd", "mse", hooks=[hooks.Lookahead(k=3)])
    model.train_on_batch(np.ones((2, 4), "float32"), np.ones((2, 1), "float32"))
    model.hooks[0].variables[-1].assign(5)  # a position beyond the cycle
    model.save(tmp_path / "bad.keras")
    with pytest.raises(ValueError, match=r"position in the cycle must be from 0 to 2"):
        keras.models.load_model(tmp_path / "bad.keras")
