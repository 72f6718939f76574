"""`Hook`: the base class of every step hook.

A hook takes part in the train and test steps of `keras_custom.Model`. It overrides
only the stages it needs; every stage is a no-op by default, and a stage a hook does
not override costs nothing (the model never calls it).
"""

import re
import weakref

import keras
import numpy as np
from keras import ops

from keras_custom import _keras
from keras_custom import _validation

_SCHEDULE = keras.optimizers.schedules.LearningRateSchedule


class Strength:
    """A hook argument that is a float or a `LearningRateSchedule`.

    A float strength lives in a Keras variable once the hook is built, so it can be
    changed between steps (from a callback, say) without tracing the step again:
    `hook.max_norm = 0.5`. A schedule is evaluated at the optimizer's step.

    With `zero_drops` set, a strength that is the float `0.0` when the hook is
    built is structurally zero: the hook leaves the term it weighs out of the
    compiled step (`Hook.is_zero(name)`), so it costs nothing. Setting a non-zero
    value later (from a callback, say) makes the model trace its step again, once,
    with the term.

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
        # Every check comes before any change: a refused value leaves the hook,
        # its config and its saved state as they were.
        value = _validation.strength(hook, self.name, value, self.minimum, self.inclusive)
        variable = hook._strength_variables.get(self.name)
        if variable is not None and isinstance(value, _SCHEDULE):
            raise ValueError(
                f"{type(hook).__name__}: `{self.name}` cannot change from a float "
                "to a schedule after the hook is built (the compiled step reads "
                f"a variable). Recompile with the schedule. Received: "
                f"{self.name}={value!r}"
            )
        raised = self.name in hook._zero_strengths and float(value) != 0.0
        hook._strengths[self.name] = value
        if variable is not None:
            variable.assign(float(value))
        if raised:
            # The term was left out of the compiled step while it was 0: the
            # model traces its step again, once, with the term.
            hook._zero_strengths.discard(self.name)
            owner = hook._owner()
            if owner is not None:
                owner._kc_retrace()


@keras.saving.register_keras_serializable(package="keras_custom")
class Hook(_keras.KerasSaveable):
    """Base class for the hooks of `keras_custom.Model.compile(hooks=[...])`.

    Subclass it and override only the stages you need. In a train step the stages
    run in this order, each hook in list order within a stage:

    1. `loss_term`: after the forward pass, inside the gradient tape. The returned
       scalar is added to the loss that is differentiated (and to the loss of the
       test step, so `loss` and `val_loss` measure the same thing).
       (`compute_gradients`: at most one hook per model may take over how the
       forward pass, the loss and the gradients are computed, e.g.
       `DifferentialPrivacy`; the stages after it are the model's as usual.)
    2. `process_gradients`: after the backward pass, before the optimizer. The
       gradients are **unscaled** (a loss scale of mixed precision is undone),
       **aggregated** (summed over replicas: the gradient of the global batch) and,
       with gradient accumulation, **accumulated**. A hook returns the gradients it
       wants the next hook, and finally the optimizer, to see.
    3. `after_update`: after the optimizer applied the update.
    4. `check`: in Python, after the compiled training call returned (to raise
       an error a hook recorded in its variables).

    A hook may also give `fit` Keras callbacks (`callbacks`), for what happens
    around validation or at the end of training.

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

    # Whether `loss_term` reads the batch (`x`, `y`, `y_pred`, `sample_weight`).
    # A term of the weights alone (a penalty) sets it to False: a hook that clips
    # each example's gradient (`DifferentialPrivacy`) accepts only such terms,
    # whose gradient it adds whole, unclipped.
    loss_term_uses_data = True

    def __init__(self, start_step=0, stop_step=None, name=None):
        self._strengths = {}
        self._strength_variables = {}
        self._zero_strengths = set()
        self._variables = []
        self._kept_on_skip = set()
        self._declared = {}
        self._pending_state = None
        self._owner_ref = None
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
        if name is None:
            name = _snake_case(type(self).__name__)
        self.name = _validation.name(self, name)

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

    def compute_gradients(self, model, x, y, sample_weight, variables):
        """Takes over the forward pass, the loss and the gradients of a train step.

        At most one hook per model may override it (`compile` refuses two), and
        not with a `start_step`/`stop_step` window. The model then calls it
        instead of taking the gradients itself; everything after it is the
        model's as usual: the loss tracker, the sum over replicas, unscaling,
        gradient accumulation, `process_gradients`, the update, `after_update`.
        It runs inside the compiled step. The default is what the model does
        without such a hook, so an override may call
        `super().compute_gradients(...)` and add to it.

        Args:
            model: the model.
            x: the batch's inputs (this replica's part of the batch).
            y: its targets.
            sample_weight: its sample weights, or `None`.
            variables: the variables to differentiate, or `None` for
                `model.trainable_variables` (read after the forward pass, which
                may build the model).

        Returns:
            `(y_pred, loss, grads)`: the predictions, the loss as
            `model.compute_loss` gives it (compiled loss, `model.losses`, every
            hook's `loss_term`), and its gradients in the order of `variables`
            (of the loss scaled by `model.optimizer.scale_loss`, as the model's
            own gradients are; the model unscales them).
        """
        y_pred, loss, grads, _ = model._kc_loss_and_grads(x, y, sample_weight, variables)
        return y_pred, loss, grads

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

    def callbacks(self):
        """Keras callbacks that `fit` runs before the user's callbacks.

        For what a hook does at the level of `fit` rather than of a step: around
        validation (`on_test_begin`/`on_test_end`), at the end of training
        (`on_train_end`), a value computed in Python at an epoch's end (as
        `DifferentialPrivacy` computes `epsilon`)... They run before the user's
        callbacks, `History` and the progress bar, so what one adds to the
        epoch's logs reaches `History`, `CSVLogger`, `TensorBoard` and
        `EarlyStopping`. They run in Python, outside the compiled step, and only
        in `fit` (not in `train_on_batch`, `evaluate` called on its own, or a
        hand-written loop). `fit` calls this once per call; return the same
        instances each time (a `keras.callbacks.CallbackList` the user passes to
        several `fit` calls gets each instance once). The default: none.

        On JAX, `fit` keeps the model's state outside its variables during an
        epoch: the variables are current in `on_test_begin`, `on_test_end`,
        `on_epoch_end` and `on_train_end`, not in batch-level methods.
        """
        return []

    # ------------------------------------------------------------------ helpers
    @property
    def step_state(self):
        """The `StepState` of the step running now: the model, the batch, the loss,
        the step, whether the loss scale overflowed... (see
        `keras_custom.StepState`). Raises outside a step of the hook's model."""
        from keras_custom.step.state import StepState

        state = StepState.current()
        if state is None or self._owner() is not state.model:
            raise RuntimeError(
                f"{type(self).__name__}: `step_state` is only available while a step "
                "of the hook's model runs (from a stage such as `process_gradients`)."
            )
        return state

    def log(self, name, value, reduction="mean"):
        """Reports a scalar under `name`.

        It reaches the progress bar, `History`, `CSVLogger` and `TensorBoard`. The
        epoch value is the mean over the epoch's steps (`reduction="mean"`) or their
        sum (`reduction="sum"`, for counts). Call it from any stage; a hook outside
        its `start_step`/`stop_step` window logs nothing that counts.

        The names a hook logs are found before the first step, on every backend:
        nothing needs declaring. A name may not be `loss`, start with `val_`, be
        the name of a compiled metric, or be logged by another hook (`ValueError`).
        """
        from keras_custom.step.state import StepState

        state = StepState.current()
        if state is None or self._owner() is not state.model:
            raise RuntimeError(
                f"{type(self).__name__}: `log({name!r}, ...)` can only be called "
                "during a step of the hook's model. Pass the hook to "
                "`model.compile(hooks=[...])` and log from one of its stages."
            )
        state.model._kc_log(state, self, name, value, reduction)

    def skip_update(self, condition):
        """Asks the model to skip this step's update where `condition` is true.

        Call it from `process_gradients`. A skipped step changes nothing: weights,
        optimizer slots and `optimizer.iterations` stay bit-identical, and so do
        the model's non-trainable variables (BatchNormalization's statistics, as
        they were before the forward pass) and every hook's state (except
        variables made with `add_variable(..., rolls_back=False)`).
        """
        state = self.step_state
        if not state.in_gradient_stages:
            raise RuntimeError(
                f"{type(self).__name__}: `skip_update` can only be called during a "
                "train step (from `process_gradients`)."
            )
        condition = ops.convert_to_tensor(condition)
        if state.active is not None:
            condition = ops.logical_and(condition, state.active)
        state.model._kc.may_skip = True
        state.request_skip(condition)

    def declare_log(self, name, reduction="mean"):
        """Declares a name this hook logs (optional: `log` finds names itself).

        Call it from `__init__` or `build`. Declared names are checked when the
        hook is compiled (a name that is taken is an error at `compile`), and with
        `reduction="sum"` the name is a count from the start.
        """
        from keras_custom.step.logs import check_name
        from keras_custom.step.logs import check_reduction

        check_name(type(self).__name__, name)
        check_reduction(type(self).__name__, reduction)
        self._declared[name] = reduction

    def add_variable(
        self, shape=(), initializer="zeros", dtype="float32", name=None, rolls_back=True
    ):
        """Creates a non-trainable Keras variable holding part of the hook's state.

        Variables are saved in `.keras` files and restored with the model. Call
        it from `build`. A step whose update is skipped restores the variable to
        its value before the step, unless `rolls_back=False` (for state that must
        count skipped steps, such as a guard's counter).
        """
        variable = keras.Variable(
            initializer=initializer,
            shape=shape,
            dtype=dtype,
            trainable=False,
            name=name or f"{self.name}_{len(self._variables)}",
        )
        self._variables.append(variable)
        if not rolls_back:
            self._kept_on_skip.add(id(variable))
        return variable

    @property
    def variables(self):
        """The hook's state variables."""
        return list(self._variables)

    def is_active(self, step):
        """A boolean tensor: whether the hook is active at `step`."""
        step = ops.convert_to_tensor(step)
        return step_in_window(step, self.start_step, self.stop_step)

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
                step = self.step_state.model.current_step()
            return ops.cast(value(step), "float32")
        variable = self._strength_variables.get(name)
        if variable is None:
            return ops.convert_to_tensor(float(value), "float32")
        return ops.convert_to_tensor(variable)

    def _owner(self):
        """The model the hook is attached to, or `None`."""
        return None if self._owner_ref is None else self._owner_ref()

    def _set_owner(self, model):
        self._owner_ref = None if model is None else weakref.ref(model)

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
        # reference object of a known kind (see `_keras.SAVEABLE_TYPE`).
        return _keras.SAVEABLE_TYPE

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
        """Loads saved state, checked first with the constructor's rules: a file
        whose values break them, or disagree with the hook's configuration, is
        refused and the hook is left as it was."""
        label = f"{type(self).__name__}(name={self.name!r})"
        if len(values) != len(self._variables):
            raise ValueError(
                f"{label}: the saved state has {len(values)} variables, the hook has "
                f"{len(self._variables)} (a file written for another configuration)."
            )
        values = [np.asarray(v) for v in values]
        for variable, value in zip(self._variables, values):
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"{label}: the saved value of {variable.name!r} has shape "
                    f"{tuple(value.shape)}, the hook's variable {tuple(variable.shape)}."
                )
        position = {id(v): i for i, v in enumerate(self._variables)}
        for name, variable in self._strength_variables.items():
            saved = values[position[id(variable)]].item()
            rule = getattr(type(self), name, None)
            if isinstance(rule, Strength):
                try:
                    _validation.strength(self, name, saved, rule.minimum, rule.inclusive)
                except ValueError as e:
                    raise ValueError(f"The file's saved state is refused. {e}") from None
            configured = float(np.float32(self._strengths[name]))
            if saved != configured:
                raise ValueError(
                    f"{label}: the file's saved state says {name}={saved!r}, its "
                    f"configuration says {name}={configured!r}; a file whose "
                    "configuration and state disagree is refused."
                )
        self.check_state(values)
        for variable, value in zip(self._variables, values):
            variable.assign(value)

    def check_state(self, values):
        """Checks state read from a file before it is loaded (raise `ValueError`).

        `values` are NumPy arrays in the order of `self.variables`. Strengths are
        checked already (with the constructor's rules, and against the
        configuration); override this for other state with rules of its own.
        """

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _snake_case(name):
    """`"ClipByGlobalNorm"` -> `"clip_by_global_norm"` (as Keras names layers)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def step_in_window(step, start, stop=None):
    """A boolean tensor: `start <= step < stop` (`stop=None`: no end).

    `start` and `stop` may exceed what `step`'s dtype holds (int32 on JAX): a
    bound it cannot reach is never crossed.
    """
    limit = int(np.iinfo(keras.backend.standardize_dtype(step.dtype)).max)
    if start > limit:
        return ops.zeros_like(step, dtype="bool")
    active = ops.greater_equal(step, start) if start > 0 else ops.ones_like(step, "bool")
    if stop is not None and stop <= limit:
        active = ops.logical_and(active, ops.less(step, stop))
    return active
