"""`kc.Model` / `kc.Sequential` are drop-ins for the Keras classes."""

import keras
import numpy as np
import pytest
from conftest import assert_weights_equal
from conftest import mlp

import keras_custom as kc
from keras_custom import hooks


def fit_both(make, data, **fit_kwargs):
    """Trains a Keras model and a keras_custom model built the same way."""
    x, y = data
    results = []
    for cls in (keras, kc):
        model = make(cls)
        model.compile(keras.optimizers.Adam(0.01), "mse", metrics=["mae"])
        keras.utils.set_random_seed(1)
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, **fit_kwargs)
        results.append((model, history.history))
    return results


def test_functional_without_hooks_equals_keras(data):
    (km, kh), (cm, ch) = fit_both(lambda m: mlp(m.Model), data, validation_split=0.25)
    assert_weights_equal(km, cm)
    assert kh.keys() == ch.keys()
    for key in kh:
        np.testing.assert_array_equal(kh[key], ch[key])


def test_sequential_without_hooks_equals_keras(data):
    def make(m):
        keras.utils.set_random_seed(0)
        return m.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(4, activation="relu"),
                keras.layers.Dense(1),
            ]
        )

    (km, kh), (cm, ch) = fit_both(make, data)
    assert_weights_equal(km, cm)
    assert kh == ch


def test_functional_call_does_not_change_model_class():
    bases = kc.Model.__bases__
    model = mlp(kc.Model)
    assert isinstance(model, kc.Model)
    assert isinstance(model, kc.Functional)
    assert kc.Model.__bases__ == bases

    class Net(kc.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

    net = Net()
    assert not isinstance(net, keras.src.models.functional.Functional)
    net.compile("sgd", "mse", hooks=[hooks.ClipByValue(1.0)])
    net.fit(np.ones((4, 3)), np.ones((4, 1)), verbose=0)
    assert kc.Model.__bases__ == bases
    # And a Sequential after both.
    seq = kc.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    assert not isinstance(seq, kc.Functional)


def test_functional_subclass_with_inputs_outputs():
    class Wrapped(kc.Model):
        pass

    inputs = keras.Input((3,))
    model = Wrapped(inputs, keras.layers.Dense(2)(inputs))
    assert isinstance(model, kc.Functional) and isinstance(model, Wrapped)
    assert model(np.ones((1, 3))).shape == (1, 2)

    class Plain(kc.Model):  # a later subclass is unaffected by the rewrite above
        def call(self, x):
            return x

    assert not issubclass(Plain, kc.Functional)


def test_wrap_existing_keras_model_shares_layers(data):
    x, y = data
    base = mlp(keras.Model)
    wrapped = kc.Model(base.inputs, base.outputs)
    assert [id(w) for w in wrapped.weights] == [id(w) for w in base.weights]
    wrapped.compile("sgd", "mse", hooks=[hooks.ClipByGlobalNorm(1.0)])
    before = base.get_weights()[0].copy()
    wrapped.fit(x, y, epochs=1, verbose=0)
    assert not np.array_equal(before, base.get_weights()[0])


def test_hooks_property_and_recompile(data):
    x, y = data
    model = mlp()
    assert model.hooks == []
    penalty = hooks.WeightPenalty(l2=0.1)
    model.compile("sgd", "mse", hooks=[penalty])
    assert model.hooks == [penalty]
    h1 = model.fit(x, y, epochs=1, verbose=0).history
    assert "weight_penalty" in h1
    model.compile("sgd", "mse", hooks=[hooks.LogGradNorm()])
    h2 = model.fit(x, y, epochs=1, verbose=0).history
    assert "grad_norm" in h2 and "weight_penalty" not in h2
    grad_norm = model.hooks[0]
    model.compile("adam", "mse")  # no `hooks=`: the model keeps its hooks
    assert model.hooks == [grad_norm]
    assert set(model.fit(x, y, epochs=1, verbose=0).history) == {"loss", "grad_norm"}
    model.compile("sgd", "mse", hooks=[])
    assert model.hooks == []
    assert set(model.fit(x, y, epochs=1, verbose=0).history) == {"loss"}


def test_penalty_is_in_loss_and_val_loss(data):
    """`loss` and `val_loss` both include the hook's term: same data, same value."""
    x, y = data
    model = mlp()
    model.compile(keras.optimizers.SGD(0.0), "mse", hooks=[hooks.WeightPenalty(l2=1.0)])
    history = model.fit(x, y, validation_data=(x, y), epochs=1, batch_size=64, verbose=0)
    h = history.history
    np.testing.assert_allclose(h["loss"], h["val_loss"], rtol=1e-5)
    np.testing.assert_allclose(h["weight_penalty"], h["val_weight_penalty"], rtol=1e-5)
    kernels = [w for w in model.weights if w.path.endswith("kernel")]
    want = sum(float(np.sum(np.square(keras.ops.convert_to_numpy(w)))) for w in kernels)
    np.testing.assert_allclose(h["weight_penalty"][0], want, rtol=1e-5)
    mse = float(np.mean((model.predict(x, verbose=0) - y) ** 2))
    np.testing.assert_allclose(h["loss"][0], mse + want, rtol=1e-5)
    assert "val_grad_norm" not in h


def test_gradient_logs_are_epoch_means(data):
    x, y = data
    model = mlp()
    model.compile(keras.optimizers.SGD(0.0), "mse", hooks=[hooks.LogGradNorm()])
    per_batch = []

    class Grab(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            per_batch.append(logs["grad_norm"])

    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[Grab()])
    # Batch logs are running means; with lr 0 each batch's norm is recoverable.
    norms = [per_batch[0]] + [
        (i + 1) * per_batch[i] - i * per_batch[i - 1] for i in range(1, len(per_batch))
    ]
    assert len(set(np.round(norms, 4))) > 1
    np.testing.assert_allclose(history.history["grad_norm"][0], np.mean(norms), rtol=1e-5)


def test_evaluate_and_predict(data):
    x, y = data
    model = mlp()
    model.compile(
        "sgd",
        "mse",
        metrics=["mae"],
        hooks=[hooks.WeightPenalty(l1=0.01), hooks.LogGradNorm()],
    )
    model.fit(x, y, epochs=1, verbose=0)
    result = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(result) == {"loss", "mae", "weight_penalty"}
    assert model.predict(x, verbose=0).shape == (64, 1)


@pytest.mark.parametrize("option", ["run_eagerly", "jit_compile", "steps_per_execution"])
def test_compile_options(data, option):
    x, y = data
    kwargs = {
        "run_eagerly": {"run_eagerly": True},
        "jit_compile": {"jit_compile": True},
        "steps_per_execution": {"steps_per_execution": 2},
    }[option]
    if option == "steps_per_execution" and keras.backend.backend() == "torch":
        pytest.skip("Keras: steps_per_execution is not supported on torch")
    model = mlp()
    model.compile(
        keras.optimizers.SGD(0.01),
        "mse",
        hooks=[
            hooks.WeightPenalty(l2=1e-3),
            hooks.ClipByGlobalNorm(0.5),
            hooks.LogGradNorm(),
        ],
        **kwargs,
    )
    h = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert h["grad_norm"][0] <= 0.5 + 1e-6
    assert np.isfinite(h["loss"][0])


def test_sample_and_class_weight(data):
    x, y = data
    sw = np.linspace(0.0, 2.0, len(x)).astype("float32")
    results = []
    for cls in (keras, kc):
        model = mlp(cls.Model)
        model.compile(keras.optimizers.SGD(0.01), "mse")
        model.fit(x, y, sample_weight=sw, batch_size=16, epochs=1, verbose=0)
        results.append(model)
    assert_weights_equal(*results)
    labels = (y[:, 0] > 0).astype("int32")
    clf = kc.Sequential([keras.Input((6,)), keras.layers.Dense(2, activation="softmax")])
    clf.compile("sgd", "sparse_categorical_crossentropy", hooks=[hooks.LogGradNorm()])
    h = clf.fit(x, labels, class_weight={0: 1.0, 1: 3.0}, epochs=1, verbose=0).history
    assert np.isfinite(h["grad_norm"][0])


def test_multi_output_loss_dict_and_weights(data):
    x, y = data
    inputs = keras.Input((6,))
    h = keras.layers.Dense(4)(inputs)
    model = kc.Model(
        inputs,
        {
            "a": keras.layers.Dense(1, name="a")(h),
            "b": keras.layers.Dense(1, name="b")(h),
        },
    )
    model.compile(
        "sgd",
        loss={"a": "mse", "b": "mae"},
        loss_weights={"a": 1.0, "b": 0.5},
        hooks=[hooks.ClipByNorm(1.0), hooks.LogGradNorm()],
    )
    history = model.fit(x, {"a": y, "b": -y}, epochs=1, verbose=0).history
    assert {"loss", "a_loss", "b_loss", "grad_norm"} <= set(history)


def test_callbacks_see_hook_logs(data, tmp_path):
    x, y = data
    model = mlp()
    model.compile("sgd", "mse", hooks=[hooks.LogGradNorm(), hooks.LogLearningRate()])
    csv = tmp_path / "log.csv"
    model.fit(x, y, epochs=2, verbose=0, callbacks=[keras.callbacks.CSVLogger(str(csv))])
    header = csv.read_text().splitlines()[0].split(",")
    assert {"grad_norm", "learning_rate", "loss"} <= set(header)
    assert len(csv.read_text().splitlines()) == 3


def test_learning_rate_schedule_is_logged_per_step(data):
    x, y = data
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [0.1, 0.01])
    model = mlp()
    model.compile(keras.optimizers.SGD(schedule), "mse", hooks=[hooks.LogLearningRate()])
    h = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    # Four steps (0..3); step <= 2 uses 0.1 (the boundary is inclusive), step 3 0.01.
    want = np.mean([float(schedule(step)) for step in range(4)])
    assert want == pytest.approx((0.1 * 3 + 0.01) / 4)
    np.testing.assert_allclose(h["learning_rate"][0], want, rtol=1e-6)
