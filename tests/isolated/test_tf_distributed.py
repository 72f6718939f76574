"""Two replicas (`MirroredStrategy` over two logical CPUs) give the single-device
result: the gradient hooks see the gradient of the global batch.

Runs in a process of its own (`tests/run.py`): the logical devices must be set
before TensorFlow initializes.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import pytest  # noqa: E402

if keras.backend.backend() != "tensorflow":
    pytest.skip("tf.distribute: TensorFlow backend only", allow_module_level=True)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _CPU, [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras_custom as kc  # noqa: E402
from keras_custom import hooks  # noqa: E402

RTOL = 1e-6  # relative difference of each weight tensor, in L2 norm
BATCH = 16  # global batch: 8 samples per replica


_STRATEGY = []


def mirrored():
    """One strategy for the whole process.

    TensorFlow 2.21 caches a collective's shape by its instance key, and every new
    `MirroredStrategy` starts its keys afresh: a second strategy whose all-reduce
    has another shape fails ("Shape mismatch in the collective instance 100"),
    with plain Keras models too.
    """
    if not _STRATEGY:
        _STRATEGY.append(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    return _STRATEGY[0]


def data(nan_at=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1)) * 3.0 + 1.0).astype("float32")
    if nan_at is not None:
        x[nan_at] = np.nan
    return x, y


def build(make_hooks, strategy=None, cls=kc.Model, optimizer=None, seed=0):
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((6,))
        h = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
        model = cls(inputs, keras.layers.Dense(1, name="out")(h))
        kwargs = {} if cls is keras.Model else {"hooks": make_hooks()}
        model.compile(
            optimizer or keras.optimizers.SGD(0.1, momentum=0.9), "mse", **kwargs
        )
    return model


def train(model, x, y, epochs=1):
    history = model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    return [np.array(w) for w in model.get_weights()], history.history


def assert_close(ws, expected):
    """Same weights up to float32 rounding: ||w - w_single|| <= 1e-6 ||w_single||.

    The replicas sum two half-batch means where one device takes one mean, so the
    last bits differ; the norm is over all the weights (a bias that cancels to
    near zero can differ by more than 1e-6 relative on its own).
    """
    assert len(ws) == len(expected)
    a = np.concatenate([np.ravel(w) for w in ws])
    b = np.concatenate([np.ravel(w) for w in expected])
    error = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert error <= RTOL, error


def assert_same(single, replicated):
    (w1, h1), (w2, h2) = single, replicated
    assert_close(w2, w1)
    assert h1.keys() == h2.keys()
    for key in h1:
        np.testing.assert_allclose(h2[key], h1[key], rtol=1e-5, err_msg=key)


def _gradient_hooks():
    """Every gradient hook of keras_custom.hooks that exists, with bounds that bite."""
    wanted = [
        ("ClipByValue", {"limit": 0.05}),
        ("ClipByNorm", {"max_norm": 0.2}),
        ("AdaptiveClip", {"clip_factor": 0.01}),
        ("ClipByGlobalNorm", {"max_norm": 0.3}),
    ]
    return [(name, kw) for name, kw in wanted if hasattr(hooks, name)]


@pytest.mark.parametrize("name,kwargs", _gradient_hooks(), ids=lambda v: str(v))
def test_each_gradient_hook_matches_single_device(name, kwargs):
    x, y = data()

    def make():
        return [
            hooks.LogGradNorm(name="grad_norm_raw"),
            getattr(hooks, name)(**kwargs),
            hooks.LogGradNorm(),
        ]

    single = train(build(make), x, y)
    replicated = train(build(make, mirrored()), x, y)
    assert_same(single, replicated)
    # The bound bites: the raw gradient is larger than what the optimizer got.
    assert single[1]["grad_norm"][0] < single[1]["grad_norm_raw"][0]


def test_logging_hooks_report_global_values():
    x, y = data()
    names = ["LogWeightNorm", "LogLearningRate", "LogUpdateRatio"]

    def make():
        return [hooks.LogGradNorm()] + [
            getattr(hooks, n)() for n in names if hasattr(hooks, n)
        ]

    single = train(build(make), x, y, epochs=2)
    replicated = train(build(make, mirrored()), x, y, epochs=2)
    assert_same(single, replicated)
    # grad_norm is the norm of the global gradient, by hand for the first step.
    model = build(lambda: [])
    with tf.GradientTape() as tape:
        loss = keras.losses.mean_squared_error(y[:BATCH], model(x[:BATCH]))
        loss = tf.reduce_mean(loss)
    grads = tape.gradient(loss, model.trainable_variables)
    first = float(tf.linalg.global_norm(grads))
    one_step = train(
        build(lambda: [hooks.LogGradNorm()], mirrored()), x[:BATCH], y[:BATCH]
    )
    np.testing.assert_allclose(one_step[1]["grad_norm"][0], first, rtol=1e-5)


def test_loss_term_counts_once():
    x, y = data()

    def make():
        return [hooks.WeightPenalty(l2=0.05), hooks.ClipByGlobalNorm(0.3)]

    assert_same(train(build(make), x, y), train(build(make, mirrored()), x, y))


@pytest.mark.skipif(not hasattr(hooks, "SkipNonFinite"), reason="no SkipNonFinite")
def test_nan_on_one_replica_skips_on_all():
    # Sample 28 is in the second batch, in the second replica's half.
    x, y = data(nan_at=28)

    def make():
        return [hooks.SkipNonFinite(), hooks.ClipByGlobalNorm(0.3), hooks.LogGradNorm()]

    single = train(build(make), x, y)
    model = build(make, mirrored())
    replicated = train(model, x, y)
    assert replicated[1]["skipped_steps"] == [1.0]
    assert int(model.optimizer.iterations.numpy()) == 1
    w1, h1 = single
    w2, h2 = replicated
    assert_close(w2, w1)
    assert h1["skipped_steps"] == h2["skipped_steps"]
    # Every copy of every variable is identical across the replicas.
    for variable in model.trainable_variables + model.optimizer.variables:
        copies = [v.numpy() for v in variable.value.values]
        np.testing.assert_array_equal(copies[0], copies[1])


@pytest.mark.skipif(not hasattr(hooks, "SharpnessAware"), reason="no SharpnessAware")
def test_second_pass_is_aggregated():
    x, y = data()

    def make():
        return [hooks.SharpnessAware(rho=0.05), hooks.LogGradNorm()]

    assert_same(train(build(make), x, y), train(build(make, mirrored()), x, y))


def test_attached_model_matches_single_device():
    """`kc.attach` on a plain Keras model made under the strategy (its hooks'
    state is made in the model's strategy scope): the single-device result of the
    same model built from `kc.Model`, a NaN on one replica skipped on both."""
    x, y = data(nan_at=28)

    def make():
        return [
            hooks.WeightPenalty(l2=0.05),
            hooks.SkipNonFinite(),
            hooks.ClipByGlobalNorm(0.3),
            hooks.LogGradNorm(),
        ]

    single = train(build(make), x, y, epochs=2)
    model = build(make, mirrored(), cls=keras.Model)
    kc.attach(model, make())
    replicated = train(model, x, y, epochs=2)
    assert type(model).__name__ == "Functional" and len(model.hooks) == 4
    assert replicated[1]["skipped_steps"] == [1.0, 1.0]
    assert_same(single, replicated)
    for variable in model.trainable_variables + model.optimizer.variables:
        copies = [v.numpy() for v in variable.value.values]
        np.testing.assert_array_equal(copies[0], copies[1])


def test_plain_keras_clips_per_replica_ours_does_not():
    """The closed-form case of docs/what-hooks-see.md (one weight, w0 = 0)."""
    x = np.ones((2, 1), "float32")
    y = np.array([[-1.0], [-3.0]], "float32")

    def one_step(strategy, cls, **kw):
        with strategy.scope():
            inputs = keras.Input((1,))
            dense = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")
            model = cls(inputs, dense(inputs))
            model.compile(
                keras.optimizers.SGD(1.0, **kw),
                "mse",
                **(
                    {} if cls is keras.Model else {"hooks": [hooks.ClipByGlobalNorm(1.0)]}
                ),
            )
        model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0)
        return float(model.get_weights()[0][0, 0])

    default = tf.distribute.get_strategy()
    # d/dw mean((w - y)^2) = 4 at w=0: clipped to 1, one step of lr 1 gives -1.
    assert one_step(default, keras.Model, global_clipnorm=1.0) == -1.0
    assert one_step(mirrored(), keras.Model, global_clipnorm=1.0) == -2.0  # Keras
    assert one_step(default, kc.Model) == -1.0
    assert one_step(mirrored(), kc.Model) == -1.0


def test_save_and_reload_under_strategy(tmp_path):
    x, y = data()

    def make():
        return [hooks.ClipByGlobalNorm(0.3), hooks.LogGradNorm()]

    model = build(make, mirrored())
    train(model, x, y)
    path = str(tmp_path / "m.keras")
    model.save(path)
    with mirrored().scope():
        restored = keras.models.load_model(path)
    w1, h1 = train(model, x, y)
    w2, h2 = train(restored, x, y)
    assert_close(w2, w1)
    np.testing.assert_allclose(h2["grad_norm"], h1["grad_norm"], rtol=1e-6)


def test_training_recipes_match_single_device():
    """Averages, slow weights and scaled updates see the update of the global
    batch; validation with the average swaps mirrored variables."""
    x, y = data()

    def make():
        return [
            hooks.GradientCentralization(),
            hooks.ScaleGradients({"hidden": 0.5}),
            hooks.LayerwiseDecay(0.5),
            hooks.Lookahead(k=2, alpha=0.5),
            hooks.WeightAverage(decay=0.9, validate_with_average=True),
        ]

    def run(strategy=None):
        model = build(make, strategy)
        history = model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=2,
            validation_data=(x[:16], y[:16]),
            shuffle=False,
            verbose=0,
        )
        state = [v.numpy() for h in model.hooks for v in h.variables]
        return model, [np.array(w) for w in model.get_weights()], history.history, state

    _, w1, h1, s1 = run()
    model, w2, h2, s2 = run(mirrored())
    assert_close(w2, w1)
    assert_close(s2, s1)
    np.testing.assert_allclose(h2["val_loss"], h1["val_loss"], rtol=1e-5)
    ema = model.hooks[-1]
    with ema.averaged(model):
        averaged = model.evaluate(x[:16], y[:16], verbose=0)
    np.testing.assert_allclose(averaged, h2["val_loss"][-1], rtol=1e-6)
    hook_state = [v for h in model.hooks for v in h.variables]
    for variable in model.trainable_variables + hook_state:
        copies = [v.numpy() for v in variable.value.values]
        np.testing.assert_array_equal(copies[0], copies[1])
