"""A hand-written training loop applies the hooks with one call."""

import keras
import numpy as np
from conftest import assert_weights_equal
from conftest import mlp
from conftest import only_backends

from keras_custom import hooks


@only_backends("tensorflow")
def test_gradient_tape_loop_matches_fit(data):
    import tensorflow as tf

    x, y = data

    def stack():
        return [
            hooks.WeightPenalty(l2=1e-2),
            hooks.ClipByGlobalNorm(0.1),
            hooks.LogGradNorm(),
        ]

    fitted = mlp()
    fitted.compile(keras.optimizers.SGD(0.1), "mse", hooks=stack())
    fitted.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)

    looped = mlp()
    looped.compile(keras.optimizers.SGD(0.1), "mse", hooks=stack())

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            pred = looped(xb, training=True)
            # compute_loss adds the hooks' loss terms (the penalty) to the loss.
            loss = looped.compute_loss(xb, yb, pred)
        grads = tape.gradient(loss, looped.trainable_variables)
        return looped.apply_hooks(grads)

    for i in range(0, 64, 16):
        out = step(x[i : i + 16], y[i : i + 16])
    assert_weights_equal(fitted, looped, rtol=1e-6, atol=1e-7)
    assert int(looped.optimizer.iterations) == 4
    norm = np.sqrt(sum(np.sum(np.square(g.numpy())) for g in out))
    assert norm <= 0.1 + 1e-6
    assert float(looped.get_metrics_result()["grad_norm"]) > 0
