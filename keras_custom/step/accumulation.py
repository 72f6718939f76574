"""Gradient accumulation done by the model, so that hooks see the accumulated gradient.

Keras's optimizers accumulate inside `apply`, after any code that could process the
gradients. When the optimizer is compiled with `gradient_accumulation_steps=N`, the
model takes that over: the optimizer's attribute then reads `None`, the model sums
the gradients of N micro-steps in `GradientAccumulation`'s variables and runs the
gradient stages (hooks, update, after-update) once on their mean.
"""

from keras import ops

from keras_custom.hook import Hook
from keras_custom.step import loss_scale

_TAKEN = "_kc_accumulation_steps"  # on the optimizer: N, after the model took it


class GradientAccumulation(Hook):
    """The model's gradient accumulators (a hook only for its state and saving).

    Holds one sum per trainable variable, the sum of the losses and the number of
    micro-steps since the last update; saved with the model like a hook's state.
    """

    def __init__(self, steps, name="gradient_accumulation"):
        super().__init__(name=name)
        self.steps = int(steps)

    def build(self, model):
        self.sums = [
            self.add_variable(shape=v.shape, dtype=v.dtype, name=f"{self.name}_sum")
            for v in model.trainable_variables
        ]
        self.loss_sum = self.add_variable(name=f"{self.name}_loss_sum")
        self.count = self.add_variable(dtype="int32", name=f"{self.name}_count")

    def check_state(self, values):
        count = int(values[-1])
        if not 0 <= count < self.steps:
            raise ValueError(
                "Gradient accumulation: the file's saved micro-step count must be "
                f"from 0 to {self.steps - 1} (gradient_accumulation_steps="
                f"{self.steps}). Received: count={count}"
            )

    def add(self, grads, loss):
        """Adds one micro-step; returns `(mean grads, mean loss, ready)`."""
        if len(grads) != len(self.sums):
            raise ValueError(
                "Gradient accumulation: the model has "
                f"{len(grads)} trainable variables, the accumulators were built for "
                f"{len(self.sums)}. Recompile after changing which weights train."
            )
        count = ops.add(self.count.value, 1)
        ready = ops.greater_equal(count, self.steps)
        self.count.assign(ops.where(ready, ops.zeros_like(count), count))
        means = []
        for total, g in zip(self.sums, grads):
            if g is None:
                means.append(None)
                continue
            new = ops.add(total.value, ops.cast(g, total.dtype))
            total.assign(ops.where(ready, ops.zeros_like(new), new))
            means.append(ops.divide(new, ops.cast(self.steps, new.dtype)))
        if loss is not None:
            new = ops.add(self.loss_sum.value, ops.cast(loss, "float32"))
            self.loss_sum.assign(ops.where(ready, ops.zeros_like(new), new))
            loss = ops.divide(new, float(self.steps))
        return means, loss, ready


def take_over(optimizer):
    """Takes over the optimizer's `gradient_accumulation_steps`.

    Returns a `GradientAccumulation`, or `None` when the optimizer does not
    accumulate. The optimizer must not be built yet (Keras would have created its
    own accumulators).
    """
    opt = loss_scale.inner(optimizer) if optimizer is not None else None
    if opt is None:
        return None
    own = getattr(opt, "gradient_accumulation_steps", None)
    steps = own or opt.__dict__.get(_TAKEN)
    if not steps:
        return None
    if own and getattr(opt, "built", False):
        raise ValueError(
            "compile: an optimizer with `gradient_accumulation_steps` must not be "
            "built yet (the model accumulates the gradients itself so that hooks "
            "see the accumulated gradient). Pass a new optimizer. Received: "
            f"gradient_accumulation_steps={steps}"
        )
    object.__setattr__(opt, _TAKEN, steps)
    opt.gradient_accumulation_steps = None
    return GradientAccumulation(steps)


def write_steps(config, steps):
    """Writes `gradient_accumulation_steps` back into a serialized optimizer, so a
    saved file names the optimizer as the user configured it."""
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        return
    inner = config["config"].get("inner_optimizer")
    if config.get("class_name") == "LossScaleOptimizer" and isinstance(inner, dict):
        write_steps(inner, steps)
    else:
        config["config"]["gradient_accumulation_steps"] = steps


def resume(optimizer, steps):
    """The accumulation of a loaded model whose file says it accumulated `steps`
    micro-steps (its optimizer was compiled without them)."""
    opt = loss_scale.inner(optimizer)
    object.__setattr__(opt, _TAKEN, steps)
    return GradientAccumulation(steps)
