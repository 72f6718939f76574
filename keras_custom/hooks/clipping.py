"""Gradient clipping hooks, each a thin class around a pure `keras.ops` function."""

import keras
from keras import ops

from keras_custom.hook import Hook
from keras_custom.hook import Strength


def global_norm(grads):
    """The L2 norm of all gradients together (`None` entries are skipped).

    Example:

    >>> float(global_norm([keras.ops.array([3.0]), None, keras.ops.array([4.0])]))
    5.0
    """
    total = ops.convert_to_tensor(0.0, "float32")
    for g in grads:
        if g is not None:
            total = total + ops.sum(ops.square(ops.cast(g, "float32")))
    return ops.sqrt(total)


def _scale(g, factor):
    return ops.multiply(g, ops.cast(factor, g.dtype))


def clip_by_value(grads, limit):
    """Clips every element to `[-limit, limit]`.

    Example:

    >>> clip_by_value([keras.ops.array([-3.0, 0.5])], 1.0)[0].tolist()
    [-1.0, 0.5]
    """
    out = []
    for g in grads:
        if g is None:
            out.append(None)
        else:
            lim = ops.cast(limit, g.dtype)
            out.append(ops.clip(g, -lim, lim))
    return out


def clip_by_norm(grads, max_norm):
    """Rescales each tensor whose L2 norm exceeds `max_norm` to norm `max_norm`.

    Tensors already within the bound are returned bit-identical.

    Example:

    >>> clip_by_norm([keras.ops.array([3.0, 4.0])], 1.0)[0].tolist()
    [0.6000000238418579, 0.800000011920929]
    """
    max_norm = ops.cast(max_norm, "float32")
    out = []
    for g in grads:
        if g is None:
            out.append(None)
            continue
        norm = ops.sqrt(ops.sum(ops.square(ops.cast(g, "float32"))))
        out.append(_scale(g, max_norm / ops.maximum(norm, max_norm)))
    return out


def clip_by_global_norm(grads, max_norm, norm=None):
    """Rescales all gradients together so that their global norm is <= `max_norm`.

    Gradients already within the bound are returned bit-identical (Pascanu et al.
    2013).

    Args:
        grads: a list of tensors (`None` entries pass through).
        max_norm: the bound, > 0.
        norm: the global norm, if already computed.

    Example:

    >>> out = clip_by_global_norm([keras.ops.array([3.0]), keras.ops.array([4.0])], 1.0)
    >>> [round(float(g[0]), 6) for g in out]
    [0.6, 0.8]
    """
    max_norm = ops.cast(max_norm, "float32")
    if norm is None:
        norm = global_norm(grads)
    factor = max_norm / ops.maximum(norm, max_norm)
    return [None if g is None else _scale(g, factor) for g in grads]


@keras.saving.register_keras_serializable(package="keras_custom")
class ClipByValue(Hook):
    """Clips every gradient element to `[-limit, limit]`.

    Args:
        limit: a float > 0 or a `LearningRateSchedule`.
        **kwargs: `start_step`, `stop_step`, `name` (see `Hook`).

    Example:

    >>> ClipByValue(0.5).limit
    0.5
    """

    limit = Strength(minimum=0.0)

    def __init__(self, limit, **kwargs):
        super().__init__(**kwargs)
        self.limit = limit

    def process_gradients(self, grads, variables, step):
        return clip_by_value(grads, self.strength("limit", step))


@keras.saving.register_keras_serializable(package="keras_custom")
class ClipByNorm(Hook):
    """Clips each gradient tensor to L2 norm `max_norm` (per tensor).

    Args:
        max_norm: a float > 0 or a `LearningRateSchedule`.
        **kwargs: `start_step`, `stop_step`, `name` (see `Hook`).

    Example:

    >>> ClipByNorm(1.0).max_norm
    1.0
    """

    max_norm = Strength(minimum=0.0)

    def __init__(self, max_norm, **kwargs):
        super().__init__(**kwargs)
        self.max_norm = max_norm

    def process_gradients(self, grads, variables, step):
        return clip_by_norm(grads, self.strength("max_norm", step))


@keras.saving.register_keras_serializable(package="keras_custom")
class ClipByGlobalNorm(Hook):
    """Rescales all gradients together so their global L2 norm is <= `max_norm`.

    The global norm is taken over every trainable variable at once, across
    optimizer groups and over the gradient of the global batch (see "what your hooks
    see"). Gradients already under the bound are untouched.

    Args:
        max_norm: a float > 0 or a `LearningRateSchedule`.
        **kwargs: `start_step`, `stop_step`, `name` (see `Hook`).

    References:
        Pascanu, Mikolov, Bengio. On the difficulty of training recurrent neural
        networks. ICML 2013. https://arxiv.org/abs/1211.5063

    Example:

    >>> ClipByGlobalNorm(1.0).max_norm
    1.0
    """

    max_norm = Strength(minimum=0.0)

    def __init__(self, max_norm, **kwargs):
        super().__init__(**kwargs)
        self.max_norm = max_norm

    def process_gradients(self, grads, variables, step):
        return clip_by_global_norm(grads, self.strength("max_norm", step))
