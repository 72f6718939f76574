"""Guards: hooks that protect training from bad steps."""

import keras
from keras import ops

from keras_custom import _validation
from keras_custom.hook import Hook

# `SkipNonFinite.cause` codes: no cause recorded, the loss, or 1 + the index of
# the first variable whose gradient was not finite.
_NO_CAUSE = -1
_LOSS = 0


def all_finite(tensors):
    """Whether every element of every tensor is finite (`None` entries skipped).

    Returns:
        A boolean scalar tensor.

    Example:

    >>> bool(all_finite([keras.ops.array([1.0, 2.0]), None]))
    True
    >>> bool(all_finite([keras.ops.array([1.0, float("nan")])]))
    False
    """
    ok = ops.convert_to_tensor(True)
    for t in tensors:
        if t is not None:
            ok = ops.logical_and(ok, ops.all(ops.isfinite(t)))
    return ok


def first_nonfinite(loss, grads):
    """Where a step first went non-finite, as an int32 code.

    Returns:
        `-1` when the loss and all gradients are finite, `0` when the loss is not
        finite, else `1 + i` for the first `i` with a non-finite `grads[i]`
        (`None` entries and a `None` loss count as finite).

    Example:

    >>> nan = float("nan")
    >>> int(first_nonfinite(keras.ops.array(1.0),
    ...                     [keras.ops.array([1.0]), keras.ops.array([nan])]))
    2
    """
    flags = [ops.convert_to_tensor(True) if loss is None else ops.all(ops.isfinite(loss))]
    flags += [
        ops.convert_to_tensor(True) if g is None else ops.all(ops.isfinite(g))
        for g in grads
    ]
    bad = ops.logical_not(ops.stack(flags))
    first = ops.cast(ops.argmax(ops.cast(bad, "int32")), "int32")
    return ops.where(ops.any(bad), first, ops.convert_to_tensor(_NO_CAUSE, "int32"))


@keras.saving.register_keras_serializable(package="keras_custom")
class SkipNonFinite(Hook):
    """Skips the update of a step whose loss or gradients are NaN or Inf.

    A skipped step changes nothing: weights, optimizer slots and
    `optimizer.iterations` stay bit-identical, so a run with one NaN batch ends
    where the run without that batch ends. The number of skipped steps is logged
    as `skipped_steps`, a count per epoch (a sum, not a mean). The batch's loss
    still enters the epoch's `loss` (it shows as NaN), so that a skipped batch
    stays visible.

    With `max_consecutive=n`, `fit` and `train_on_batch` stop with a
    `FloatingPointError` once `n` steps in a row were skipped, naming the cause:
    the loss, or the path of the first variable whose gradient was not finite.
    Steps after the `n`-th skip in a row are skipped as well until the error is
    raised, which happens after the compiled call that saw it (at most
    `steps_per_execution` steps later), from `Hook.check`.

    The loss it checks is the one of the step (mean over the batch, with the
    hooks' loss terms); in `model.apply_hooks` (a hand-written loop) only the
    gradients are checked. Put it first among the gradient hooks so that its
    counts and error name the raw gradients. Under loss scaling
    (`LossScaleOptimizer`, e.g. `mixed_float16`), a step whose scaled gradients
    overflowed is the loss scaler's: the model skips it and lowers the scale, and
    this hook neither counts it nor lets it break a run of consecutive skips
    (a non-finite loss still counts).

    Args:
        max_consecutive: `None` (never stop) or an integer >= 1: how many
            skipped steps in a row stop training with an error.
        name: the log name (default `"skipped_steps"`).
        **kwargs: `start_step`, `stop_step` (see `Hook`).

    Example:

    ```python
    import keras
    import numpy as np
    import keras_custom as kc

    x = np.ones((32, 3), "float32")
    x[8:16] = np.nan                       # the second batch of 8 is broken
    model = kc.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("adam", "mse", hooks=[kc.hooks.SkipNonFinite()])
    history = model.fit(x, np.ones((32, 1)), batch_size=8, shuffle=False,
                        verbose=0)
    assert history.history["skipped_steps"] == [1.0]
    assert int(model.optimizer.iterations) == 3
    ```

    References:
        Optax's `apply_if_finite` follows the same idea:
        https://optax.readthedocs.io/en/latest/api/transformations.html
    """

    def __init__(self, max_consecutive=None, name="skipped_steps", **kwargs):
        super().__init__(name=_validation.name(self, name), **kwargs)
        self.max_consecutive = _validation.optional_int(
            self, "max_consecutive", max_consecutive, 1, _validation.INT32_MAX
        )
        self._paths = []
        self.declare_log(self.name, reduction="sum")

    def build(self, model):
        # The guard's own counters count skipped steps: a skip keeps them.
        self.consecutive = self.add_variable(
            dtype="int32", name=f"{self.name}_consecutive", rolls_back=False
        )
        self.tripped = self.add_variable(
            dtype="int32", name=f"{self.name}_tripped", rolls_back=False
        )
        self.cause = self.add_variable(
            initializer=_NO_CAUSE,
            dtype="int32",
            name=f"{self.name}_cause",
            rolls_back=False,
        )
        self.tripped_step = self.add_variable(
            dtype="int32", name=f"{self.name}_tripped_step", rolls_back=False
        )

    def process_gradients(self, grads, variables, step):
        self._paths = [v.path for v in variables]
        state = self.step_state
        cause = first_nonfinite(state.loss, grads)
        bad = ops.greater_equal(cause, 0)
        # Under loss scaling an overflow of the scaled gradients is the scaler's
        # business (the model skips that step and lowers the scale): not counted
        # here unless the loss itself is not finite.
        overflow = state.model.loss_scale_overflow()
        if overflow is not None:
            bad = ops.logical_or(
                ops.equal(cause, _LOSS),
                ops.logical_and(bad, ops.logical_not(overflow)),
            )
        active = self.is_active(step)
        bad = ops.logical_and(bad, active)
        self.log(self.name, ops.cast(bad, "float32"), reduction="sum")
        skip = bad
        if self.max_consecutive is not None:
            # `.value`: JAX refuses a variable object inside traced `ops` calls.
            consecutive = self.consecutive.value
            tripped = ops.greater(self.tripped.value, 0)
            count = ops.where(bad, consecutive + 1, ops.zeros_like(consecutive))
            count = ops.where(active, count, consecutive)
            if overflow is not None:  # a loss-scale overflow neither counts nor resets
                count = ops.where(
                    ops.logical_and(overflow, ops.logical_not(bad)), consecutive, count
                )
            self.consecutive.assign(count)
            trip_now = ops.logical_and(
                ops.logical_not(tripped), ops.greater_equal(count, self.max_consecutive)
            )
            self.cause.assign(ops.where(trip_now, cause, self.cause.value))
            self.tripped_step.assign(
                ops.where(
                    trip_now,
                    ops.cast(step, self.tripped_step.dtype),
                    self.tripped_step.value,
                )
            )
            tripped = ops.logical_or(tripped, trip_now)
            self.tripped.assign(ops.cast(tripped, "int32"))
            # Once tripped, nothing more is applied until the error is raised.
            skip = ops.logical_or(skip, ops.logical_and(tripped, active))
        self.skip_update(skip)
        return grads

    def check_state(self, values):
        if len(values) != 4:  # strengths none; four counters
            return
        consecutive, tripped, cause, tripped_step = (int(v) for v in values)
        if (
            consecutive < 0
            or tripped not in (0, 1)
            or cause < _NO_CAUSE
            or tripped_step < 0
        ):
            raise ValueError(
                f"SkipNonFinite(name={self.name!r}): the file's saved counters are "
                "not valid (consecutive >= 0, tripped 0 or 1, cause >= -1, step >= 0). "
                f"Received: consecutive={consecutive}, tripped={tripped}, "
                f"cause={cause}, tripped_step={tripped_step}"
            )

    def check(self, model):
        if self.max_consecutive is None or not self.built:
            return
        if int(ops.convert_to_numpy(self.tripped)) == 0:
            return
        cause = int(ops.convert_to_numpy(self.cause))
        step = int(ops.convert_to_numpy(self.tripped_step))
        # Reset, so that training can resume once the cause is fixed.
        self.tripped.assign(0)
        self.consecutive.assign(0)
        self.cause.assign(_NO_CAUSE)
        if cause == _LOSS:
            what = "the loss is not finite (NaN or Inf)"
        elif 0 < cause <= len(self._paths):
            what = (
                f"the gradient of {self._paths[cause - 1]!r} is not finite (NaN or Inf)"
            )
        else:
            what = "a gradient is not finite (NaN or Inf)"
        raise FloatingPointError(
            f"SkipNonFinite: {self.max_consecutive} consecutive steps were skipped "
            f"(max_consecutive={self.max_consecutive}): {what} (after {step} applied "
            "updates). "
            "Training stopped: check the data, the learning rate and the loss."
        )

    def get_config(self):
        config = super().get_config()
        config["max_consecutive"] = self.max_consecutive
        return config
