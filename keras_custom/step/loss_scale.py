"""Loss scaling (`keras.optimizers.LossScaleOptimizer`, as `mixed_float16` sets up).

The step takes gradients of the scaled loss. Before any hook sees them they are
unscaled here, and whether they were finite is recorded; the model applies the inner
optimizer itself and keeps the scale's books with `update_scale`, written without
branches so that it runs the same way on every backend and on every replica.
"""

import keras
from keras import ops

LossScaleOptimizer = keras.optimizers.LossScaleOptimizer


def is_scaled(optimizer):
    return isinstance(optimizer, LossScaleOptimizer)


def inner(optimizer):
    """The optimizer that applies updates (the one a `LossScaleOptimizer` wraps)."""
    return optimizer.inner_optimizer if is_scaled(optimizer) else optimizer


def unscale(optimizer, grads):
    """The gradients divided by the loss scale (unchanged without loss scaling)."""
    if not is_scaled(optimizer):
        return list(grads)
    scale = optimizer.dynamic_scale
    return [None if g is None else ops.divide(g, ops.cast(scale, g.dtype)) for g in grads]


def finite(optimizer, grads):
    """Under loss scaling, whether every gradient is finite; else `None`."""
    if not is_scaled(optimizer):
        return None
    return optimizer.check_finite(grads)


def update_scale(optimizer, finite, applied):
    """The loss scale's bookkeeping after a step, as `LossScaleOptimizer` keeps it.

    Applied: count the step, doubling the scale every `dynamic_growth_steps`.
    Non-finite gradients: halve the scale and reset the count. Finite but skipped by
    a hook: unchanged.
    """
    counter = optimizer.step_counter.value
    scale = optimizer.dynamic_scale.value
    if applied is None:
        applied = finite
    grow = ops.equal(counter, optimizer.dynamic_growth_steps - 1)
    zero = ops.zeros_like(counter)
    counted = ops.where(grow, zero, counter + 1)
    grown = ops.where(grow, scale * 2.0, scale)
    optimizer.step_counter.assign(
        ops.where(applied, counted, ops.where(finite, counter, zero))
    )
    optimizer.dynamic_scale.assign(
        ops.where(applied, grown, ops.where(finite, scale, scale * 0.5))
    )
