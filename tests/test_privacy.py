"""DifferentialPrivacy on every backend: the private gradient against an explicit
loop over examples, the noise, the accounting, saving and resuming, refusals.

The reference for an example's gradient is the weight change of a plain
`keras.Model` (same weights, `SGD(1.0)`) trained on that example alone: Keras's own
gradient of the compiled loss on a batch of one, which shares no code with the
hook. Clipping, sums and means are then done in NumPy (float64).
"""

import re
import warnings

import keras
import numpy as np
import pytest

import keras_custom as kc
from keras_custom import _keras
from keras_custom import hooks
from keras_custom import privacy

npv = keras.ops.convert_to_numpy
B = 8
TOL = dict(rtol=1e-5, atol=2e-6)


def scce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# -------------------------------------------------------------------- models
# Each takes the model class (keras.Model or kc.Model) and returns the same
# architecture with the same initial weights.


def dense(cls):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(5, activation="tanh")(inputs)
    h = keras.layers.Dense(4, activation="relu", use_bias=False)(h)
    return cls(inputs, keras.layers.Dense(3)(h))


def embedding(cls):
    keras.utils.set_random_seed(2)
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(4, 3)(inputs)  # tiny vocabulary: repeated tokens
    h = keras.layers.Flatten()(h)
    return cls(inputs, keras.layers.Dense(3)(h))


def conv(cls):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((5, 5, 2))
    h = keras.layers.Conv2D(3, 3, activation="relu")(inputs)  # local fallback
    h = keras.layers.Flatten()(h)
    return cls(inputs, keras.layers.Dense(3)(h))


def transformer(cls):
    """Embedding, MultiHeadAttention (EinsumDense projections), LayerNormalization
    (local fallback), a Dense on a sequence, pooling, and a layer used twice
    (global fallback)."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((5,), dtype="int32")
    e = keras.layers.Embedding(7, 4)(inputs)
    a = keras.layers.MultiHeadAttention(num_heads=2, key_dim=2)(e, e)
    h = keras.layers.LayerNormalization()(e + a)
    twice = keras.layers.Dense(4, activation="tanh")
    h = twice(twice(h))
    h = keras.layers.GlobalAveragePooling1D()(h)
    return cls(inputs, keras.layers.Dense(3)(h))


def data(name, n=B, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=(n,))
    if name in ("embedding", "transformer"):
        vocabulary = 4 if name == "embedding" else 7
        return rng.integers(0, vocabulary, size=(n, 5)).astype("int32"), y
    if name == "conv":
        return rng.normal(size=(n, 5, 5, 2)).astype("float32"), y
    return rng.normal(size=(n, 6)).astype("float32"), y


MODELS = {
    "dense": dense,
    "embedding": embedding,
    "conv": conv,
    "transformer": transformer,
}


def private(build, clip, noise=0.0, optimizer=None, **kwargs):
    model = build(kc.Model)
    kwargs.setdefault("seed", 0)
    model.compile(
        optimizer or keras.optimizers.SGD(1.0),
        scce(),
        hooks=[hooks.DifferentialPrivacy(clip, noise, **kwargs)],
    )
    return model


def example_gradients(build, weights, x, y, sample_weight):
    """Each example's gradient, from a plain Keras SGD(1.0) step on it alone."""
    model = build(keras.Model)
    model.compile(keras.optimizers.SGD(1.0), scce())
    out = []
    for i in range(len(y)):
        model.set_weights(weights)
        model.train_on_batch(
            x[i : i + 1], y[i : i + 1], sample_weight=sample_weight[i : i + 1]
        )
        out.append([np.float64(w0) - w1 for w0, w1 in zip(weights, model.get_weights())])
    return out


def clipped_mean(per_example, clip, divisor=None):
    norms = np.array([np.sqrt(sum((g**2).sum() for g in grads)) for grads in per_example])
    factors = clip / np.maximum(norms, clip)
    divisor = len(per_example) if divisor is None else divisor
    mean = [
        sum(f * grads[k] for f, grads in zip(factors, per_example)) / divisor
        for k in range(len(per_example[0]))
    ]
    return mean, norms


def update_of(model, *batch, **kwargs):
    before = model.get_weights()
    model.train_on_batch(*batch, **kwargs)
    return [np.float64(a) - b for a, b in zip(before, model.get_weights())]


# ----------------------------------------------- the gradient, against a loop
@pytest.mark.parametrize("name", sorted(MODELS))
def test_private_gradient_matches_a_loop_over_examples(name):
    build = MODELS[name]
    x, y = data(name)
    sw = np.random.default_rng(5).uniform(0.5, 2.0, size=(B,)).astype("float32")
    weights = build(keras.Model).get_weights()
    per_example = example_gradients(build, weights, x, y, sw)
    _, norms = clipped_mean(per_example, 1.0)
    clip = float(np.median(norms))  # about half of the examples are clipped
    expected, _ = clipped_mean(per_example, clip)
    updates = {}
    for method in ("fast", "vectorized"):
        model = private(build, clip, method=method)
        model.set_weights(weights)
        updates[method] = update_of(model, x, y, sample_weight=sw)
        for variable, e, u in zip(model.trainable_variables, expected, updates[method]):
            np.testing.assert_allclose(u, e, err_msg=f"{method}: {variable.path}", **TOL)
    for f, v in zip(updates["fast"], updates["vectorized"]):
        np.testing.assert_allclose(f, v, rtol=1e-5, atol=1e-6)
    # The model is as it was: no instance `call` left, same classes.
    for layer in _keras.all_layers(model):
        assert "call" not in layer.__dict__, layer.name


def test_no_noise_and_an_unreached_clip_is_plain_training():
    """Same weights and logs as plain training, regularizers and penalties
    included, over epochs whose last batch is short (10 examples, batches of 4)."""
    x, y = data("dense", n=10)

    def build(dp):
        keras.utils.set_random_seed(7)
        inputs = keras.Input((6,))
        h = keras.layers.Dense(
            5, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.01)
        )(inputs)
        model = kc.Model(inputs, keras.layers.Dense(3)(h))
        extra = [hooks.DifferentialPrivacy(1e6, 0.0, seed=0)] if dp else []
        model.compile(
            keras.optimizers.SGD(0.5),
            scce(),
            hooks=[hooks.WeightPenalty(l2=0.02), *extra],
        )
        return model

    plain, dp = build(False), build(True)
    h1 = plain.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    h2 = dp.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(plain.get_weights(), dp.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for key in ("loss", "weight_penalty"):
        np.testing.assert_allclose(h1.history[key], h2.history[key], rtol=1e-5)
    assert int(npv(dp.hooks[1].steps)) == 6


def test_poisson_batches_divide_by_the_expected_size():
    """A padded Poisson batch: the padding (weight 0) adds nothing, and the sum is
    divided by `expected_batch_size`, not by the batch's size."""
    x, y = data("dense", n=40, seed=2)
    batches = privacy.poisson_batches(x, y, 10, seed=3, pad_to_multiple_of=8)
    bx, by, bw = batches[0]
    real = batches.indices(0)
    assert len(bx) % 8 == 0 and len(bx) > len(real) and bw.sum() == len(real)
    weights = dense(keras.Model).get_weights()
    per_example = example_gradients(dense, weights, x[real], y[real], np.ones(len(real)))
    expected, _ = clipped_mean(per_example, 0.5, divisor=10)
    model = private(dense, 0.5, expected_batch_size=10)
    model.set_weights(weights)
    for e, u in zip(expected, update_of(model, bx, by, sample_weight=bw)):
        np.testing.assert_allclose(u, e, **TOL)


# ------------------------------------------------------------------- noise
@keras.saving.register_keras_serializable(package="test_privacy")
def zero_loss(y_true, y_pred):
    """A loss whose gradient is exactly zero: the update is the noise alone."""
    return keras.ops.mean(y_pred) * 0.0


def wide(**kwargs):
    keras.utils.set_random_seed(0)
    model = kc.Sequential([keras.Input((6,)), keras.layers.Dense(2000, name="wide")])
    model.compile(
        keras.optimizers.SGD(1.0),
        zero_loss,
        hooks=[hooks.DifferentialPrivacy(0.5, 2.0, **kwargs)],
    )
    return model


@pytest.mark.parametrize("expected_batch_size", [None, 10])
def test_noise_has_the_right_scale_and_never_repeats(expected_batch_size):
    model = wide(seed=1, expected_batch_size=expected_batch_size)
    x, y = np.ones((4, 6), "float32"), np.zeros((4, 2000), "float32")
    divisor = expected_batch_size or 4
    updates = []
    for _ in range(2):
        update = np.concatenate([u.ravel() for u in update_of(model, x, y)])
        assert update.size == 14000
        assert update.std() == pytest.approx(2.0 * 0.5 / divisor, rel=0.05)
        assert abs(update.mean()) < 0.05 * update.std()
        updates.append(update)
    assert abs(np.corrcoef(updates[0], updates[1])[0, 1]) < 0.05


def test_same_seed_same_noise_after_save_and_reload(tmp_path):
    x, y = np.ones((4, 6), "float32"), np.zeros((4, 2000), "float32")
    straight = wide(seed=3)
    update_of(straight, x, y)
    second = update_of(straight, x, y)
    first = wide(seed=3)
    update_of(first, x, y)
    first.save(tmp_path / "dp.keras")
    resumed = keras.models.load_model(tmp_path / "dp.keras")
    (hook,) = resumed.hooks
    assert hook.get_config() == first.hooks[0].get_config()
    assert int(npv(hook.steps)) == 1
    for a, b in zip(update_of(resumed, x, y), second):
        np.testing.assert_array_equal(a, b)
    other = wide(seed=4)
    assert not np.allclose(update_of(other, x, y)[0], second[0])


# -------------------------------------------------------------- accounting
def direct_epsilon(noise_multiplier, sample_rate, steps, delta):
    """epsilon from dp_accounting itself, with the hook's events."""
    dp_accounting = pytest.importorskip("dp_accounting")
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    event = dp_accounting.PoissonSampledDpEvent(
        sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


def test_epsilon_is_the_value_after_each_epoch():
    pytest.importorskip("dp_accounting")
    x, y = data("dense", n=10)
    model = private(dense, 1.0, 2.0, num_examples=10, delta=1e-3)
    with pytest.warns(UserWarning, match="Poisson-sampled with rate 0.4"):
        history = model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    # 3 steps per epoch, batches of at most 4 of 10 examples.
    expected = [direct_epsilon(2.0, 0.4, steps, 1e-3) for steps in (3, 6)]
    np.testing.assert_allclose(history.history["epsilon"], expected, rtol=1e-9)
    assert model.hooks[0].epsilon() == pytest.approx(expected[-1], rel=1e-9)


def test_resume_from_a_file_equals_an_uninterrupted_run(tmp_path):
    pytest.importorskip("dp_accounting")
    x, y = data("dense", n=12)

    def run(model, epochs):
        return model.fit(x, y, batch_size=4, epochs=epochs, shuffle=False, verbose=0)

    def fresh():
        return private(
            dense, 0.5, 1.0, num_examples=12, delta=1e-3, accountant="rdp", seed=9
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        straight = fresh()
        both = run(straight, 2).history["epsilon"]
        first = fresh()
        run(first, 1)
        first.save(tmp_path / "dp.keras")
        resumed = keras.models.load_model(tmp_path / "dp.keras")
        after = run(resumed, 1).history["epsilon"]
    for a, b in zip(resumed.get_weights(), straight.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert int(npv(resumed.hooks[0].steps)) == 6
    assert after == pytest.approx([both[1]], rel=1e-12)


def test_target_epsilon_stops_at_an_epoch_end_or_refuses_to_start():
    pytest.importorskip("dp_accounting")
    x, y = data("dense", n=10)
    rate = 0.4  # batches of 4 of 10 examples, 3 steps per epoch
    one, two = (privacy.epsilon(1.0, rate, s, 1e-3, "rdp") for s in (3, 6))
    target = (one + two) / 2
    model = private(
        dense,
        1.0,
        1.0,
        num_examples=10,
        delta=1e-3,
        accountant="rdp",
        target_epsilon=target,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.warns(UserWarning, match="training stops"):
            history = model.fit(x, y, batch_size=4, epochs=5, verbose=0)
    assert len(history.history["epsilon"]) == 1
    assert history.history["epsilon"][0] == pytest.approx(one) and one <= target
    before = model.get_weights()
    with pytest.raises(ValueError, match="Training did not start"):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(npv(model.hooks[0].steps)) == 3


def test_accounting_functions():
    pytest.importorskip("dp_accounting")
    rdp = privacy.epsilon(1.1, 0.01, 500, 1e-5, accountant="rdp")
    pld = privacy.epsilon(1.1, 0.01, 500, 1e-5)
    assert 0 < pld <= rdp  # RDP is an upper bound
    assert pld == pytest.approx(direct_epsilon(1.1, 0.01, 500, 1e-5), rel=1e-12)
    assert privacy.epsilon(1.1, 0.01, 1000, 1e-5, "rdp") > rdp  # more steps
    assert privacy.epsilon(2.0, 0.01, 500, 1e-5, "rdp") < rdp  # more noise
    assert privacy.epsilon(1.1, 0.01, 0, 1e-5) == 0.0
    assert privacy.epsilon(0.0, 0.01, 5, 1e-5) == float("inf")
    sigma = privacy.noise_multiplier_for_epsilon(2.0, 0.01, 300, 1e-5, accountant="rdp")
    assert privacy.epsilon(sigma, 0.01, 300, 1e-5, "rdp") <= 2.0
    assert privacy.epsilon(sigma * 0.98, 0.01, 300, 1e-5, "rdp") > 2.0


def test_poisson_batches_sample_each_example_independently():
    x, y = np.arange(2000), -np.arange(2000)
    batches = privacy.poisson_batches(x, y, 50, seed=0, pad_to_multiple_of=1)
    assert len(batches) == 40 and batches.sample_rate == 0.025
    sizes = [len(batches.indices(i)) for i in range(40)]
    assert 40 < np.mean(sizes) < 60 and len(set(sizes)) > 5
    counts = np.bincount(np.concatenate([batches.indices(i) for i in range(40)]))
    assert counts.max() > 1  # an example may be in several batches of an epoch
    bx, by, bw = batches[3]
    np.testing.assert_array_equal(by, -bx)
    np.testing.assert_array_equal(bx, batches.indices(3))
    again = privacy.poisson_batches(x, y, 50, seed=0, pad_to_multiple_of=1)
    np.testing.assert_array_equal(again[3][0], bx)
    batches.on_epoch_end()  # a new epoch draws anew
    assert not np.array_equal(batches[3][0], bx)
    with pytest.raises(IndexError):
        batches[40]


# --------------------------------------------------------------- refusals
def mlp(*middle, outputs=1):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    h = inputs
    for layer in middle:
        h = layer(h)
    heads = [keras.layers.Dense(2)(h) for _ in range(outputs)]
    return kc.Model(inputs, heads if outputs > 1 else heads[0])


def dp(**kwargs):
    return hooks.DifferentialPrivacy(1.0, 1.0, seed=0, **kwargs)


class ReadsTheBatch(kc.Hook):
    def loss_term(self, model, x, y, y_pred, sample_weight, training):
        return keras.ops.mean(keras.ops.square(y_pred))


@pytest.mark.parametrize(
    "make, hook_list, text",
    [
        (
            lambda: mlp(keras.layers.BatchNormalization(name="bn")),
            lambda: [dp()],
            "Received: trainable BatchNormalization layers ['bn']",
        ),
        (
            lambda: mlp(keras.layers.Dense(3, activity_regularizer="l2", name="act")),
            lambda: [dp()],
            "Received: activity_regularizer on layers ['act']",
        ),
        (
            lambda: mlp(keras.layers.Dense(3, dtype="mixed_bfloat16", name="low")),
            lambda: [dp()],
            "Received: layers ['low'] not in float32",
        ),
        (
            lambda: mlp(outputs=2),
            lambda: [dp()],
            "Received: a model with 2 outputs",
        ),
        (
            lambda: mlp(),
            lambda: [hooks.ClipByGlobalNorm(1.0), dp()],
            "the hooks before it (hooks[0] ClipByGlobalNorm(name='clip_by_global_norm'))",
        ),
        (
            lambda: mlp(),
            lambda: [dp(), ReadsTheBatch()],
            "hooks[1] ReadsTheBatch(name='reads_the_batch') adds a loss term that may read",
        ),
        (
            lambda: mlp(),
            lambda: [dp(), dp(name="other")],
            "and hooks[1] DifferentialPrivacy(name='other') both compute the gradients",
        ),
        (
            lambda: mlp(keras.layers.Dropout(0.5, name="drop")),
            lambda: [dp(method="vectorized")],
            "and the layers ['drop'] draw random numbers",
        ),
    ],
)
def test_refused_at_compile(make, hook_list, text):
    model = make()
    with pytest.raises(ValueError, match=re.escape(text)):
        model.compile("sgd", "mse", hooks=hook_list())
    assert model.hooks == []  # a failed compile leaves the model as it was


class AddsALoss(keras.layers.Layer):
    def call(self, x):
        self.add_loss(keras.ops.mean(keras.ops.square(x)))
        return x


def test_a_loss_added_from_the_batch_is_refused():
    model = mlp(keras.layers.Dense(3), AddsALoss())
    model.compile("sgd", "mse", hooks=[dp()])
    with pytest.raises(ValueError, match=r"layers added 1 loss term\(s\) computed from"):
        model.train_on_batch(np.ones((2, 4)), np.ones((2, 2)))


def test_frozen_batch_normalization_and_dropout_are_accepted():
    bn = keras.layers.BatchNormalization()
    model = mlp(keras.layers.Dense(3), bn, keras.layers.Dropout(0.3))
    bn.trainable = False  # inference mode: each example is normalized alone
    model.compile("sgd", "mse", hooks=[dp()])
    model.fit(np.ones((4, 4)), np.ones((4, 2)), verbose=0)


def test_gradient_accumulation_is_refused():
    model = mlp()
    with pytest.raises(ValueError, match="Received: gradient_accumulation_steps=2"):
        model.compile(
            keras.optimizers.SGD(gradient_accumulation_steps=2), "mse", hooks=[dp()]
        )


def test_gradients_from_outside_the_step_are_refused():
    model = mlp()
    model.compile("sgd", "mse", hooks=[dp()])
    grads = [np.zeros(v.shape, "float32") for v in model.trainable_variables]
    with pytest.raises(RuntimeError, match="apply_hooks"):
        model.apply_hooks(grads)


def test_a_second_gradient_pass_is_refused():
    model = mlp()
    model.compile("sgd", "mse", hooks=[dp(), hooks.SharpnessAware(0.05)])
    with pytest.raises(RuntimeError, match="second gradient pass"):
        model.train_on_batch(np.ones((2, 4)), np.ones((2, 2)))


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"l2_norm_clip": 0.0}, "`l2_norm_clip` must be a finite float > 0"),
        ({"l2_norm_clip": "1"}, "Received: l2_norm_clip='1' of type str"),
        ({"noise_multiplier": -1.0}, "Received: noise_multiplier=-1.0"),
        ({"num_examples": 0, "delta": 1e-5}, "Received: num_examples=0"),
        ({"num_examples": 100}, "Received: num_examples=100, delta=None"),
        ({"num_examples": 100, "delta": 1.5}, "must be in (0, 1). Received: delta=1.5"),
        ({"target_epsilon": 1.0}, "Received: target_epsilon=1.0, num_examples=None"),
        (
            {
                "noise_multiplier": 0.0,
                "target_epsilon": 1.0,
                "num_examples": 9,
                "delta": 0.01,
            },
            "Received: noise_multiplier=0.0, target_epsilon=1.0",
        ),
        (
            {"expected_batch_size": 20, "num_examples": 10, "delta": 0.01},
            "Received: expected_batch_size=20",
        ),
        ({"accountant": "moments"}, "Received: accountant='moments'"),
        ({"method": "ghost"}, "Received: method='ghost'"),
        ({"seed": -1}, "Received: seed=-1"),
        ({"start_step": 5}, "Received: start_step=5, stop_step=None"),
    ],
)
def test_bad_arguments(kwargs, text):
    args = {"l2_norm_clip": 1.0, "noise_multiplier": 1.0, **kwargs}
    with pytest.raises((ValueError, TypeError), match=re.escape(text)) as info:
        hooks.DifferentialPrivacy(**args)
    assert str(info.value).startswith("DifferentialPrivacy")


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"sample_rate": 0.0}, "Received: sample_rate=0.0"),
        ({"delta": 1.0}, "Received: delta=1.0"),
        ({"steps": -1}, "Received: steps=-1"),
        ({"accountant": "moments"}, "Received: accountant='moments'"),
    ],
)
def test_bad_accounting_arguments(kwargs, text):
    args = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "delta": 1e-5}
    with pytest.raises(ValueError, match=re.escape(text)) as info:
        privacy.epsilon(**{**args, **kwargs})
    assert str(info.value).startswith("epsilon:")
