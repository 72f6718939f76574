"""Logging hooks: scalars reported through `Hook.log` (epoch means in the logs)."""

import keras
from keras import ops

from keras_custom import _keras
from keras_custom import _validation
from keras_custom.hook import Hook
from keras_custom.hooks.clipping import global_norm
from keras_custom.hooks.clipping import step_global_norm


def _layer_of(variable):
    """The layer part of a variable path: `"dense_1/kernel"` -> `"dense_1"`."""
    path = variable.path
    return path.rsplit("/", 1)[0] if "/" in path else path


@keras.saving.register_keras_serializable(package="keras_custom")
class LogGradNorm(Hook):
    """Logs the global L2 norm of the gradients as they are at its place in the list.

    Put one before and one after a clipping hook (with different names) to see the
    norm before and after clipping.

    Args:
        per_layer: also log the norm of each layer's gradients as
            `<name>/<layer path>`.
        name: the log name (default `"grad_norm"`).
        **kwargs: `start_step`, `stop_step` (see `Hook`).

    Example:

    >>> LogGradNorm(name="grad_norm_raw").name
    'grad_norm_raw'
    """

    def __init__(self, per_layer=False, name="grad_norm", **kwargs):
        super().__init__(name=_validation.name(self, name), **kwargs)
        if not isinstance(per_layer, bool):
            raise TypeError(
                "LogGradNorm: `per_layer` must be a bool. "
                f"Received: per_layer={per_layer!r}"
            )
        self.per_layer = per_layer
        self._layers = {}
        self.declare_log(self.name)

    def build(self, model):
        if self.per_layer:
            self._layers = {}
            for i, v in enumerate(model.trainable_variables):
                self._layers.setdefault(_layer_of(v), []).append(i)
            for layer in self._layers:
                self.declare_log(f"{self.name}/{layer}")

    def process_gradients(self, grads, variables, step):
        self.log(self.name, step_global_norm(self, grads))
        if self.per_layer:
            for layer, indices in self._layers.items():
                self.log(f"{self.name}/{layer}", global_norm([grads[i] for i in indices]))
        return grads

    def get_config(self):
        config = super().get_config()
        config["per_layer"] = self.per_layer
        return config


@keras.saving.register_keras_serializable(package="keras_custom")
class LogWeightNorm(Hook):
    """Logs the global L2 norm of the trainable weights after each update.

    Args:
        name: the log name (default `"weight_norm"`).
        **kwargs: `start_step`, `stop_step` (see `Hook`).

    Example:

    >>> LogWeightNorm().name
    'weight_norm'
    """

    def __init__(self, name="weight_norm", **kwargs):
        super().__init__(name=_validation.name(self, name), **kwargs)
        self.declare_log(self.name)

    def after_update(self, model, step):
        self.log(self.name, global_norm(model.trainable_variables))


def learning_rate_at(optimizer, step):
    """The learning rate `optimizer` used at `step` (a float32 tensor)."""
    return _keras.learning_rate_at(optimizer, step)


@keras.saving.register_keras_serializable(package="keras_custom")
class LogLearningRate(Hook):
    """Logs the optimizer's learning rate at each step (schedules evaluated).

    Args:
        name: the log name (default `"learning_rate"`).
        **kwargs: `start_step`, `stop_step` (see `Hook`).

    Example:

    >>> LogLearningRate().name
    'learning_rate'
    """

    def __init__(self, name="learning_rate", **kwargs):
        super().__init__(name=_validation.name(self, name), **kwargs)
        self.declare_log(self.name)

    def after_update(self, model, step):
        self.log(self.name, learning_rate_at(model.optimizer, step))


def update_ratio(old, new):
    """`||new - old|| / ||old||` over all tensors together (global L2 norms).

    Returns 0 where `||old||` is 0 (a model whose weights are all zero).

    Example:

    >>> float(update_ratio([keras.ops.array([3.0, 4.0])], [keras.ops.array([3.0, 4.5])]))
    0.10000000149011612
    """
    diff = [
        ops.subtract(ops.cast(n, "float32"), ops.cast(o, "float32"))
        for o, n in zip(old, new)
    ]
    return ops.divide_no_nan(global_norm(diff), global_norm(old))


@keras.saving.register_keras_serializable(package="keras_custom")
class LogUpdateRatio(Hook):
    """Logs `||w_new - w_old|| / ||w_old||` over all trainable weights.

    The relative size of each step's update: a common rule of thumb puts healthy
    values around 1e-3; much larger values suggest too high a learning rate, much
    smaller ones too low. `w_old` is read in `process_gradients`, `w_new` in
    `after_update`, so a skipped step logs 0 and hooks that change weights
    between the two (`Freeze` restoring frozen weights) are accounted for when
    placed before it. It keeps one copy of the trainable weights per step.

    Args:
        name: the log name (default `"update_ratio"`).
        **kwargs: `start_step`, `stop_step` (see `Hook`).

    Example:

    ```python
    import keras
    import numpy as np
    import keras_custom as kc

    model = kc.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse", hooks=[kc.hooks.LogUpdateRatio()])
    history = model.fit(np.ones((8, 4)), np.ones((8, 1)), epochs=2, verbose=0)
    print(history.history["update_ratio"])
    ```
    """

    def __init__(self, name="update_ratio", **kwargs):
        super().__init__(name=_validation.name(self, name), **kwargs)
        self.declare_log(self.name)

    def process_gradients(self, grads, variables, step):
        kept = self.step_state.scratch(self)
        kept["old"] = [ops.copy(v.value) for v in variables]
        kept["variables"] = list(variables)
        return grads

    def after_update(self, model, step):
        kept = self.step_state.scratch(self)
        old = kept.pop("old", None)
        if old is None:
            return
        new = [v.value for v in kept.pop("variables")]
        self.log(self.name, update_ratio(old, new))
