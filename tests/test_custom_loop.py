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


def _stack():
    return [
        hooks.WeightPenalty(l2=1e-2),
        hooks.ClipByGlobalNorm(0.1),
        hooks.LogGradNorm(),
    ]


def _fitted(data):
    x, y = data
    model = mlp()
    model.compile(keras.optimizers.SGD(0.1), "mse", hooks=_stack())
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    return model


@only_backends("torch")
def test_torch_autograd_loop_matches_fit(data):
    import torch

    x, y = data
    looped = mlp()
    looped.compile(keras.optimizers.SGD(0.1), "mse", hooks=_stack())
    for i in range(0, 64, 16):
        xb, yb = x[i : i + 16], y[i : i + 16]
        pred = looped(xb, training=True)
        loss = looped.compute_loss(xb, yb, pred)  # with the penalty term
        variables = looped.trainable_variables
        grads = torch.autograd.grad(loss, [v.value for v in variables])
        with torch.no_grad():
            looped.apply_hooks(list(grads))
    assert_weights_equal(_fitted(data), looped, rtol=1e-5, atol=1e-6)
    assert int(looped.optimizer.iterations) == 4


@only_backends("jax")
def test_jax_grad_loop_matches_fit(data):
    import jax

    x, y = data
    looped = mlp()
    looped.compile(keras.optimizers.SGD(0.1), "mse", hooks=_stack())
    penalty = looped.hooks[0]
    for i in range(0, 64, 16):
        xb, yb = x[i : i + 16], y[i : i + 16]
        trainable = [v.value for v in looped.trainable_variables]
        non_trainable = [v.value for v in looped.non_trainable_variables]
        paths = [v.path for v in looped.trainable_variables]

        def loss_fn(values):
            pred, _ = looped.stateless_call(values, non_trainable, xb, training=True)
            mse = keras.ops.mean(keras.ops.square(pred - yb))
            kernels = [v for v, p in zip(values, paths) if p.endswith("kernel")]
            return mse + 1e-2 * sum(keras.ops.sum(keras.ops.square(k)) for k in kernels)

        grads = jax.grad(loss_fn)(trainable)
        looped.apply_hooks(grads)
    assert penalty.l2 == 1e-2
    assert_weights_equal(_fitted(data), looped, rtol=1e-5, atol=1e-6)
    assert int(looped.optimizer.iterations) == 4
