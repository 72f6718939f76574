"""`kc.attach` on a `keras.applications` network: MobileNetV3Small, untrained.

`weights=None`: nothing is downloaded. The network is slow to compile (164
layers; a minute or more for the first step on a 2-core machine), so the test
compiles one train function: every `fit` below has batches of the same shape.
"""

import re
import time

import keras
import numpy as np

import keras_custom as kc
from keras_custom import hooks


def numpy(variable):
    return np.array(keras.ops.convert_to_numpy(variable))


def test_mobilenet_v3_small_one_epoch_with_hooks(record_property):
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV3Small(
        weights=None, input_shape=(32, 32, 3), classes=10
    )
    own = type(model)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    kc.attach(
        model,
        [hooks.WeightPenalty(l2=1e-4), hooks.SkipNonFinite(), hooks.LogGradNorm()],
    )
    assert isinstance(model, own) and type(model).__name__ == own.__name__
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(16, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=(16,)).astype("int32")

    start = time.perf_counter()
    history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0).history
    record_property("epoch_s", round(time.perf_counter() - start, 1))  # compile too
    assert history["grad_norm"][0] > 0 and history["weight_penalty"][0] > 0
    assert history["skipped_steps"] == [0.0]
    assert int(model.optimizer.iterations) == 2

    # A NaN batch changes nothing: weights, BatchNormalization statistics, the
    # optimizer's slots and step counter.
    statistics = [v for v in model.non_trainable_variables if "moving" in v.path]
    assert len(statistics) == 2 * 34  # mean and variance of 34 BatchNormalizations
    kept = [numpy(v) for v in statistics]
    before = [numpy(v) for v in model.variables + model.optimizer.variables]
    bad = np.full_like(x[:8], np.nan)
    start = time.perf_counter()
    logs = model.fit(bad, y[:8], batch_size=8, verbose=0).history
    record_property("step_s", round(time.perf_counter() - start, 2))
    assert logs["skipped_steps"] == [1.0]
    after = [numpy(v) for v in model.variables + model.optimizer.variables]
    for u, v in zip(before, after, strict=True):
        np.testing.assert_array_equal(u, v)
    # The penalty of that step: l2 * the sum of squares of the kernels (depthwise
    # ones included), not of biases or BatchNormalization's scale and offset.
    kernels = [v for v in model.trainable_variables if re.search(r"(^|_)kernel$", v.name)]
    assert len(kernels) > 30 and all("batch_norm" not in v.path for v in kernels)
    expected = 1e-4 * sum(float(np.sum(np.square(numpy(v)))) for v in kernels)
    np.testing.assert_allclose(logs["weight_penalty"][0], expected, rtol=1e-5)

    # ... while a good batch does move the statistics (the check is not vacuous).
    model.fit(x[8:], y[8:], batch_size=8, verbose=0)
    assert int(model.optimizer.iterations) == 3
    moved = [numpy(v) for v in statistics]
    assert any(not np.array_equal(u, v) for u, v in zip(kept, moved))
