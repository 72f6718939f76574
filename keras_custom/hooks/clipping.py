"""Gradient clipping hooks, each a thin class around a pure `keras.ops` function."""

import keras
from keras import ops

from keras_custom import _selection
from keras_custom import _validation
from keras_custom.hook import Hook
from keras_custom.hook import Strength

_EAGER_TORCH = keras.backend.backend() == "torch"


def global_norm(grads):
    """The L2 norm of all gradients together (`None` entries are skipped).

    Computed in float32 as the square root of the sum of squares, as Keras and optax
    do: magnitudes below about 1e-19 square to zero (their norm reads 0).

    Example:

    >>> float(global_norm([keras.ops.array([3.0]), None, keras.ops.array([4.0])]))
    5.0
    """
    total = ops.convert_to_tensor(0.0, "float32")
    for g in grads:
        if g is not None:
            total = total + sum_of_squares(g)
    return ops.sqrt(total)


def sum_of_squares(x):
    """`sum(x**2)` over every element, in float32.

    On the eager PyTorch backend, one dot product of the flattened tensor with
    itself: one kernel and no temporary tensor of squares (about 0.4 ms less per
    global norm of the benchmark MLP's gradients). Elsewhere `sum(square(x))`,
    which XLA fuses into one reduction (a dot product there measured slower).

    >>> float(sum_of_squares(keras.ops.array([[3.0], [4.0]])))
    25.0
    """
    if keras.backend.standardize_dtype(x.dtype) != "float32":
        # Only when needed: even a no-op cast costs Python work on every eager
        # PyTorch step.
        x = ops.cast(x, "float32")
    if _EAGER_TORCH:
        flat = ops.reshape(x, (-1,))
        return ops.vdot(flat, flat)
    return ops.sum(ops.square(x))


def step_global_norm(hook, grads):
    """`global_norm(grads)`, computed once per step for the same gradients.

    Two hooks that need the global norm of the same gradients (`LogGradNorm` next
    to `ClipByGlobalNorm`) share one computation, in a step of the hook's model.
    """
    from keras_custom.step.state import StepState

    state = StepState.current()
    if state is None or hook._owner() is not state.model:
        return global_norm(grads)
    return state.memo("global_norm", grads, lambda: global_norm(grads))


def _scale(g, factor):
    return ops.multiply(g, ops.cast(factor, g.dtype))


def clip_by_value(grads, limit):
    """Clips every element to `[-limit, limit]`.

    Example:

    >>> out = clip_by_value([keras.ops.array([-3.0, 0.5])], 1.0)[0]
    >>> keras.ops.convert_to_numpy(out).tolist()
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

    >>> out = clip_by_norm([keras.ops.array([3.0, 4.0])], 1.0)[0]
    >>> [round(v, 6) for v in keras.ops.convert_to_numpy(out).tolist()]
    [0.6, 0.8]
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

    With `log_norms=True` it also logs the global norm it received as
    `<name>/norm_before` and the one it passes on as `<name>/norm_after` (epoch
    means; `name` defaults to `"clip_by_global_norm"`). The gap between the two
    shows how often and how hard clipping acts.

    Args:
        max_norm: a float > 0 or a `LearningRateSchedule`.
        log_norms: log the global norm before and after clipping.
        **kwargs: `start_step`, `stop_step`, `name` (see `Hook`).

    References:
        Pascanu, Mikolov, Bengio. On the difficulty of training recurrent neural
        networks. ICML 2013. https://arxiv.org/abs/1211.5063

    Example:

    >>> ClipByGlobalNorm(1.0).max_norm
    1.0
    """

    max_norm = Strength(minimum=0.0)

    def __init__(self, max_norm, log_norms=False, **kwargs):
        super().__init__(**kwargs)
        self.max_norm = max_norm
        if not isinstance(log_norms, bool):
            raise TypeError(
                "ClipByGlobalNorm: `log_norms` must be a bool. "
                f"Received: log_norms={log_norms!r}"
            )
        self.log_norms = log_norms
        if log_norms:
            self.declare_log(f"{self.name}/norm_before")
            self.declare_log(f"{self.name}/norm_after")

    def process_gradients(self, grads, variables, step):
        max_norm = self.strength("max_norm", step)
        norm = step_global_norm(self, grads)
        if not self.log_norms:
            return clip_by_global_norm(grads, max_norm, norm=norm)
        self.log(f"{self.name}/norm_before", norm)
        self.log(f"{self.name}/norm_after", ops.minimum(norm, max_norm))
        return clip_by_global_norm(grads, max_norm, norm=norm)

    def get_config(self):
        config = super().get_config()
        config["log_norms"] = self.log_norms
        return config


def unitwise_norm(x):
    """The L2 norm of each unit of `x`, broadcastable against `x` (float32).

    A unit is a slice along the last axis (an output unit of a Dense kernel
    `(in, out)` or a Conv kernel `(kh, kw, in, out)`); a bias, a vector or a scalar
    is a single unit.

    Example:

    >>> x = keras.ops.array([[3.0, 1.0], [4.0, 0.0]])
    >>> keras.ops.convert_to_numpy(unitwise_norm(x)).tolist()
    [[5.0, 1.0]]
    """
    x = ops.cast(x, "float32")
    if len(x.shape) <= 1:
        return ops.sqrt(ops.sum(ops.square(x), keepdims=True))
    axes = tuple(range(len(x.shape) - 1))
    return ops.sqrt(ops.sum(ops.square(x), axis=axes, keepdims=True))


def adaptive_clip(grads, params, clip_factor=0.01, eps=1e-3):
    """Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021).

    For each unit (see `unitwise_norm`), the gradient is rescaled to norm
    `clip_factor * max(||w_unit||, eps)` where its norm exceeds that bound; other
    units are returned bit-identical.

    Args:
        grads: a list of gradient tensors (`None` entries pass through).
        params: the weights, same order and shapes as `grads`.
        clip_factor: the largest allowed ratio of gradient norm to weight norm.
        eps: weights with a unit norm under `eps` count as `eps` (so that
            zero-initialized weights, such as biases, can still move).

    Returns:
        The clipped gradients, same order.

    Example:

    >>> g = keras.ops.array([[3.0], [4.0]])   # one unit, ||g|| = 5
    >>> w = keras.ops.array([[0.0], [10.0]])  # ||w|| = 10
    >>> keras.ops.convert_to_numpy(adaptive_clip([g], [w], clip_factor=0.1)[0]).tolist()
    [[0.6000000238418579], [0.800000011920929]]

    References:
        Brock, De, Smith, Simonyan. High-Performance Large-Scale Image
        Recognition Without Normalization. ICML 2021.
        https://arxiv.org/abs/2102.06171
    """
    clip_factor = ops.cast(clip_factor, "float32")
    eps = ops.cast(eps, "float32")
    out = []
    for g, w in zip(grads, params):
        if g is None:
            out.append(None)
            continue
        max_norm = clip_factor * ops.maximum(unitwise_norm(w), eps)
        g_norm = unitwise_norm(g)
        factor = max_norm / ops.maximum(g_norm, 1e-30)
        clipped = _scale(g, factor)
        out.append(ops.where(ops.greater(g_norm, max_norm), clipped, g))
    return out


@keras.saving.register_keras_serializable(package="keras_custom")
class AdaptiveClip(Hook):
    """Unit-wise adaptive gradient clipping (AGC), as in NFNets.

    Each unit's gradient is rescaled where its norm exceeds
    `clip_factor * max(||w_unit||, eps)`. Units are a kernel's output units (the
    last axis in Keras layouts: `(in, out)` for Dense, `(kh, kw, in, out)` for
    Conv2D); a bias or a scalar is one unit. The weights are read as they are
    before this step's update. Brock et al. do not clip the final classifier
    layer: pass `exclude` to leave it out.

    Args:
        clip_factor: a float > 0 or a `LearningRateSchedule` (the paper uses
            0.01-0.16, smaller for larger batches).
        eps: a float > 0, the smallest weight norm a unit counts as.
        include: regular expression(s) searched in `variable.path`: clip only
            these variables (default: all).
        exclude: regular expression(s): do not clip these variables.
        **kwargs: `start_step`, `stop_step`, `name` (see `Hook`).

    Example:

    ```python
    import keras
    import numpy as np
    import keras_custom as kc

    model = kc.Sequential([keras.Input((4,)), keras.layers.Dense(8),
                           keras.layers.Dense(1, name="head")])
    model.compile("sgd", "mse",
                  hooks=[kc.hooks.AdaptiveClip(0.01, exclude="head")])
    model.fit(np.ones((8, 4)), np.ones((8, 1)), epochs=1, verbose=0)
    ```

    References:
        Brock, De, Smith, Simonyan. High-Performance Large-Scale Image
        Recognition Without Normalization. ICML 2021.
        https://arxiv.org/abs/2102.06171
    """

    clip_factor = Strength(minimum=0.0)

    def __init__(self, clip_factor=0.01, eps=1e-3, include=None, exclude=None, **kwargs):
        super().__init__(**kwargs)
        self.clip_factor = clip_factor
        self.eps = _validation.strength(self, "eps", eps)
        if isinstance(self.eps, keras.optimizers.schedules.LearningRateSchedule):
            raise TypeError(
                f"AdaptiveClip: `eps` must be a float > 0. Received: eps={eps!r}"
            )
        self.include = _validation.patterns(self, "include", include)
        self.exclude = _validation.patterns(self, "exclude", exclude)
        self._selected = None

    def build(self, model):
        if self.include is None and self.exclude is None:
            self._selected = None
            return
        chosen = _selection.select(
            self, model.trainable_variables, self.include, self.exclude
        )
        self._selected = {id(v) for v in chosen}

    def process_gradients(self, grads, variables, step):
        if self._selected is None:
            picked = list(range(len(grads)))
        else:
            picked = [i for i, v in enumerate(variables) if id(v) in self._selected]
        clipped = adaptive_clip(
            [grads[i] for i in picked],
            [variables[i] for i in picked],
            self.strength("clip_factor", step),
            self.eps,
        )
        out = list(grads)
        for i, g in zip(picked, clipped):
            out[i] = g
        return out

    def get_config(self):
        config = super().get_config()
        config.update(
            eps=self.eps,
            include=None if self.include is None else list(self.include),
            exclude=None if self.exclude is None else list(self.exclude),
        )
        return config
