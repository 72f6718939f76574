"""`Hook`: the base class of every step hook.

A hook takes part in the train and test steps of `keras_custom.Model`. It overrides
only the stages it needs; every stage is a no-op by default, and a stage a hook does
not override costs nothing (the model never calls it).
"""

import keras
from keras import ops
from keras.src.saving.keras_saveable import KerasSaveable

from keras_custom import _validation

_SCHEDULE = keras.optimizers.schedules.LearningRateSchedule


class Strength:
    """A hook argument that is a float or a `LearningRateSchedule`.

    A float strength lives in a Keras variable once the hook is built, so it can be
    changed between steps (from a callback, say) without tracing the step again:
    `hook.max_norm = 0.5`. A schedule is evaluated at the optimizer's step.

    With `zero_drops` set, a strength that is the float `0.0` when the hook is
    built is structurally zero: the hook leaves the term it weighs out of the
    compiled step (`Hook.is_zero(name)`), so it costs nothing. The step then cannot
    see a later change, and setting a non-zero value after the build is an error.

    Args:
        minimum: the smallest value allowed.
        inclusive: whether `minimum` itself is allowed (`l2=0.0` is; `max_norm=0.0`
            is not).
        zero_drops: what a zero strength leaves out of the step (e.g. `"L1 term"`),
            for the error message; `None`: a zero is kept in a variable like any
            other value.
    """

    def __init__(self, minimum=0.0, inclusive=False, zero_drops=None):
        self.minimum = minimum
        self.inclusive = inclusive
        self.zero_drops = zero_drops

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, hook, owner=None):
        if hook is None:
            return self
        return hook._strengths[self.name]

    def __set__(self, hook, value):
        value = _validation.strength(hook, self.name, value, self.minimum, self.inclusive)
        if self.name in hook._zero_strengths and (
            isinstance(value, _SCHEDULE) or float(value) != 0.0
        ):
            cls = type(hook).__name__
            raise ValueError(
                f"{cls}: `{self.name}` was 0 when the hook was built, so the compiled "
                f"step has no {self.zero_drops}; recompile with a non-zero "
                f"`{self.name}` in a new {cls} (a float or a schedule). "
                f"Received: {self.name}={value!r}"
            )
        hook._strengths[self.name] = value
        variable = hook._strength_variables.get(self.name)
        if variable is not None:
            if isinstance(value, _SCHEDULE):
                raise ValueError(
                    f"{type(hook).__name__}: `{self.name}` cannot change from a float "
                    "to a schedule after the hook is built (the compiled step reads "
                    f"a variable). Recompile with the schedule. Received: "
                    f"{self.name}={value!r}"
                )
            variable.assign(float(value))


@keras.saving.register_keras_serializable(package="keras_custom")
class Hook(KerasSaveable):
    """Base class for the hooks of `keras_custom.Model.compile(hooks=[...])`.

    Subclass it and override only the stages you need. In a train step the stages
    run in this order, each hook in list order within a stage:

    1. `loss_term`: after the forward pass, inside the gradient tape. The returned
       scalar is added to the loss that is differentiated (and to the loss of the
       test step, so `loss` and `val_loss` measure the same thing).
    2. `process_gradients`: after the backward pass, before the optimizer. The
       gradients are **unscaled** (a loss scale of mixed precision is undone),
       **aggregated** (summed over replicas: the gradient of the global batch) and,
       with gradient accumulation, **accumulated**. A hook returns the gradients it
       wants the next hook, and finally the optimizer, to see.
    3. `after_update`: after the optimizer applied the update.
    4. `check`: in Python, after the compiled training call returned (to raise
       an error a hook recorded in its variables).

    `step` is the number of optimizer updates applied before this one (0-based, what
    Keras learning-rate schedules see). A hook is active while
    `start_step <= step < stop_step`; outside that window its loss term counts zero,
    its gradient processing is bypassed and what it logs is not counted. That choice
    happens inside the compiled step: changing step never traces the step again.
    `after_update` runs every step: a hook with a window checks
    `self.is_active(step)` there itself.

    State that changes during training (counters, running statistics, random
    seeds) goes in variables made with `add_variable` in `build`: they are saved
    in `.keras` files and restored with the model.

    Args:
        start_step: first optimizer step at which the hook is active.
        stop_step: first step at which it is no longer active (`None`: never
            stops).
        name: a name for the hook (defaults to the class name in snake case).

    Example:

    >>> import keras_custom as kc
    >>> class LogPredMean(kc.Hook):
    ...     def loss_term(self, model, x, y, y_pred, sample_weight, training):
    ...         self.log("pred_mean", keras.ops.mean(y_pred))
    ...         return None
    >>> LogPredMean().get_config()["start_step"]
    0
    """

    def __init__(self, start_step=0, stop_step=None, name=None):
        self._strengths = {}
        self._strength_variables = {}
        self._zero_strengths = set()
        self._variables = []
        self._pending_state = None
        self._context = None
        self.built = False
        self.start_step = _validation.step(self, "start_step", start_step)
        self.stop_step = (
            None if stop_step is None else _validation.step(self, "stop_step", stop_step)
        )
        if self.stop_step is not None and self.stop_step <= self.start_step:
            raise ValueError(
                f"{type(self).__name__}: `stop_step` must be greater than `start_step`. "
                f"Received: start_step={start_step}, stop_step={stop_step}"
            )
        self.name = name or keras.src.utils.naming.to_snake_case(type(self).__name__)

    # ------------------------------------------------------------------ stages
    def build(self, model):
        """Creates the hook's state. Called once, before the first step.

        The model and its optimizer variables exist. Use `add_variable` for state
        and raise `ValueError` for a configuration that cannot work with `model`.
        Subclasses that override it call `super().build(model)` first.
        """

    def loss_term(self, model, x, y, y_pred, sample_weight, training):
        """Returns a scalar added to the loss, or `None` for no term.

        Runs in the train step (inside the gradient tape, `training=True`) and in
        the test step (`training=False`), after the forward pass. On several
        replicas it runs on each replica's part of the batch; the model divides the
        term by the number of replicas so that it counts once.
        """
        return None

    def process_gradients(self, grads, variables, step):
        """Returns the gradients, transformed, in the order of `variables`.

        `grads` are unscaled, summed over replicas and accumulated (see the class
        docstring); an entry may be `None` for a variable with no gradient.
        `variables` are all the model's trainable variables, even with several
        optimizers.
        """
        return grads

    def after_update(self, model, step):
        """Runs after the optimizer applied the update of step `step`."""

    def check(self, model):
        """Runs in Python after each training call, outside the compiled step.

        `fit` calls it after each batch (after each `steps_per_execution` steps),
        `train_on_batch` after its step; a hand-written loop calls
        `model.check_hooks()`. It may read the hook's variables and raise an
        exception to stop training with it (a compiled step cannot raise). Only
        hooks that override it are checked, so the host does not wait for the
        device when no hook needs to.
        """

    # ------------------------------------------------------------------ helpers
    def log(self, name, value, reduction="mean"):
        """Reports a scalar under `name`.

        It reaches the progress bar, `History`, `CSVLogger` and `TensorBoard`. The
        epoch value is the mean over the epoch's steps (`reduction="mean"`) or their
        sum (`reduction="sum"`, for counts). Call it from any stage; a hook outside
        its `start_step`/`stop_step` window logs nothing that counts.
        """
        if self._context is None:
            raise RuntimeError(
                f"{type(self).__name__}: `log({name!r}, ...)` was called before the "
                "hook was attached to a model. Pass the hook to "
                "`model.compile(hooks=[...])`."
            )
        self._context.log(self, name, value, reduction)

    def skip_update(self, condition):
        """Asks the model to skip this step's update where `condition` is true.

        Call it from `process_gradients`. A skipped step changes nothing: weights,
        optimizer slots and `optimizer.iterations` stay bit-identical.
        """
        self._context.skip_update(self, condition)

    def declare_log(self, name, reduction="mean"):
        """Creates the tracker of `name` now (call it from `build`).

        Optional: `log` creates a tracker the first time it sees a name. Declaring
        in `build` keeps variable creation out of the compiled step, which the JAX
        backend requires and which saves TensorFlow a trace of the test step.
        """
        self._context.log(self, name, None, reduction)

    def add_variable(self, shape=(), initializer="zeros", dtype="float32", name=None):
        """Creates a non-trainable Keras variable holding part of the hook's state.

        Variables are saved in `.keras` files and restored with the model. Call
        it from `build`.
        """
        variable = keras.Variable(
            initializer=initializer,
            shape=shape,
            dtype=dtype,
            trainable=False,
            name=name or f"{self.name}_{len(self._variables)}",
        )
        self._variables.append(variable)
        return variable

    @property
    def variables(self):
        """The hook's state variables."""
        return list(self._variables)

    def is_active(self, step):
        """A boolean tensor: whether the hook is active at `step`."""
        step = ops.convert_to_tensor(step)
        active = ops.greater_equal(step, self.start_step)
        if self.stop_step is not None:
            active = ops.logical_and(active, ops.less(step, self.stop_step))
        return active

    @property
    def has_window(self):
        """Whether the hook is active only part of the time."""
        return self.start_step > 0 or self.stop_step is not None

    def is_zero(self, name):
        """Whether the strength `name` was the float 0 at build time (see
        `Strength(zero_drops=...)`): the hook then leaves its term out."""
        return name in self._zero_strengths

    def strength(self, name, step=None):
        """The value of the strength `name` at `step`, as a float32 tensor.

        `step` is only read for a schedule; `None` means the model's current step.
        """
        value = self._strengths[name]
        if isinstance(value, _SCHEDULE):
            if step is None:
                step = self._context.model.current_step()
            return ops.cast(value(step), "float32")
        variable = self._strength_variables.get(name)
        if variable is None:
            return ops.convert_to_tensor(float(value), "float32")
        return ops.convert_to_tensor(variable)

    def _build(self, model):
        """Called by the model: creates strength variables, then `build`."""
        if self.built:
            return
        for name, value in self._strengths.items():
            if not isinstance(value, _SCHEDULE):
                self._strength_variables[name] = self.add_variable(
                    initializer=float(value), name=f"{self.name}_{name}"
                )
                descriptor = getattr(type(self), name, None)
                if (
                    isinstance(descriptor, Strength)
                    and descriptor.zero_drops is not None
                    and float(value) == 0.0
                ):
                    self._zero_strengths.add(name)
        self.build(model)
        self.built = True
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None

    # -------------------------------------------------------------- serialization
    def get_config(self):
        """The constructor arguments; subclasses add their own."""
        config = {
            "start_step": self.start_step,
            "stop_step": self.stop_step,
            "name": self.name,
        }
        for key, value in self._strengths.items():
            config[key] = (
                keras.saving.serialize_keras_object(value)
                if isinstance(value, _SCHEDULE)
                else value
            )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key, value in config.items():
            if isinstance(value, dict) and "class_name" in value:
                config[key] = keras.saving.deserialize_keras_object(value)
        return cls(**config)

    def _obj_type(self):
        # Keras's saving walks an object's attributes, skipping those of a
        # reference object of a known kind; a hook is closest to a `Loss`.
        return "Loss"

    def save_own_variables(self, store):
        for i, variable in enumerate(self._variables):
            store[str(i)] = ops.convert_to_numpy(variable)

    def load_own_variables(self, store):
        values = [store[str(i)] for i in range(len(store.keys()))]
        if self.built:
            self._restore(values)
        else:
            self._pending_state = values

    def _restore(self, values):
        if len(values) != len(self._variables):
            raise ValueError(
                f"{type(self).__name__}: the saved state has {len(values)} variables, "
                f"the hook has {len(self._variables)}."
            )
        for variable, value in zip(self._variables, values):
            variable.assign(value)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"
