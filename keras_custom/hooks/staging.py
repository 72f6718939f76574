"""Staging hooks: parts of the model that train only from a given step on.

Every hook takes `start_step`/`stop_step` (see `keras_custom.Hook`); this module
adds `Freeze`, which keeps chosen weights fixed for the first steps of training.
"""

import keras
from keras import ops

from keras_custom import _keras
from keras_custom import _selection
from keras_custom import _validation
from keras_custom.hook import Hook
from keras_custom.hook import step_in_window


def optimizer_slots(optimizer, variable):
    """The optimizer variables that belong to `variable` (momentum, velocity, ...).

    Looks through a `LossScaleOptimizer` and a `MultiOptimizer`.

    Returns:
        A list of `keras.Variable`s (empty when the optimizer is not built or
        keeps no per-variable state).
    """
    return _keras.optimizer_slots(optimizer, variable)


@keras.saving.register_keras_serializable(package="keras_custom")
class Freeze(Hook):
    """Keeps the chosen weights bit-identical until optimizer step `until_step`.

    While `step < until_step`, the weights whose path matches `include` do not
    change at all: their gradients are zeroed (so hooks placed after it, such as
    a global-norm clip, see them as zero) and, after the optimizer's update, the
    weights and their optimizer slots (momentum, velocity, ...) are restored to
    their values before the update. Zeroing alone would not do: Adam's momentum
    and AdamW's decoupled weight decay still move a weight whose gradient is
    zero. From `until_step` on they train normally, with fresh optimizer slots.

    Unlike `trainable=False` this needs no recompilation when the weights thaw,
    and the step is not traced again. It costs one copy of the frozen weights
    and their slots per step. Put it first in the list.

    Args:
        include: regular expression(s) searched in `variable.path`; every
            pattern must match a trainable variable.
        until_step: the first optimizer step at which the weights train (an
            integer >= 1), or `None` to keep them frozen.
        **kwargs: `start_step`, `stop_step`, `name` (see `Hook`); the weights
            are frozen while the hook is active and `step < until_step`.

    Example:

    ```python
    import keras
    import numpy as np
    import keras_custom as kc

    model = kc.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="body"),
                           keras.layers.Dense(1, name="head")])
    model.compile("adamw", "mse",
                  hooks=[kc.hooks.Freeze("body", until_step=2)])
    before = model.get_layer("body").get_weights()
    model.fit(np.ones((4, 4)), np.ones((4, 1)), batch_size=2, epochs=1, verbose=0)
    after = model.get_layer("body").get_weights()
    assert all((a == b).all() for a, b in zip(before, after))  # steps 0 and 1
    ```
    """

    def __init__(self, include, until_step=None, **kwargs):
        super().__init__(**kwargs)
        if include is None:
            raise ValueError(
                "Freeze: `include` must be a regular expression or a list of them "
                f"(the variables to freeze). Received: include={include!r}"
            )
        self.include = _validation.patterns(self, "include", include)
        self.until_step = _validation.optional_int(self, "until_step", until_step, 1)
        self._frozen = []

    def build(self, model):
        self._frozen = _selection.select(self, model.trainable_variables, self.include)

    @property
    def frozen_variables(self):
        """The variables this hook freezes (after `build`)."""
        return list(self._frozen)

    def is_frozen(self, step):
        """A boolean tensor: whether the weights are frozen at `step`."""
        step = ops.convert_to_tensor(step)
        frozen = self.is_active(step)
        if self.until_step is not None:
            frozen = ops.logical_and(frozen, step_in_window(step, 0, self.until_step))
        return frozen

    def process_gradients(self, grads, variables, step):
        ids = {id(v) for v in self._frozen}
        optimizer = self.step_state.model.optimizer
        saved = []
        for v in variables:
            if id(v) in ids:
                for t in [v, *optimizer_slots(optimizer, v)]:
                    saved.append((t, ops.copy(t.value)))
        self.step_state.scratch(self)["saved"] = saved
        frozen = self.is_frozen(step)
        return [
            g
            if g is None or id(v) not in ids
            else ops.where(frozen, ops.zeros_like(g), g)
            for g, v in zip(grads, variables)
        ]

    def after_update(self, model, step):
        saved = self.step_state.scratch(self).pop("saved", None)
        if not saved:
            return
        frozen = self.is_frozen(step)
        for variable, value in saved:
            variable.assign(ops.where(frozen, value, variable.value))

    def get_config(self):
        config = super().get_config()
        config.update(include=list(self.include), until_step=self.until_step)
        return config
