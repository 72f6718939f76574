"""The staged step, written once with `keras.ops`.

`HookedTrainer` is mixed in before a Keras model class. It owns what every backend
shares: `compile(hooks=...)`, the hooks' loss terms, the gradient stages, the
optimizer update (with the loss-scale and skip logic), the after-update stage and the
log trackers. The part that differs per backend (how gradients are taken, how the
step is compiled) lives in `keras_custom/backend/<name>.py`.
"""

import contextlib
import threading
import weakref

import keras
from keras import ops
from keras.src.losses import loss as loss_module
from keras.src.saving import serialization_lib

from keras_custom.hook import Hook

_LSO = keras.optimizers.LossScaleOptimizer


class _StepContext:
    """What a hook can reach of its model during a step (held weakly)."""

    def __init__(self, model):
        self._model = weakref.ref(model)

    @property
    def model(self):
        return self._model()

    def log(self, hook, name, value, reduction):
        self.model._kc_log(hook, name, value, reduction)

    def skip_update(self, hook, condition):
        self.model._kc_skip_update(hook, condition)


class _PerThread:
    """A model attribute whose value is per thread (the state of a traced step)."""

    _locals = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, default):
        self.default = default

    def __set_name__(self, owner, name):
        self.name = name

    def _local(self, model):
        local = self._locals.get(model)  # the common case needs no lock
        if local is None:
            with self._lock:
                local = self._locals.get(model)
                if local is None:
                    local = self._locals[model] = threading.local()
        return local

    def __get__(self, model, owner=None):
        if model is None:
            return self
        return getattr(self._local(model), self.name, self.default)

    def __set__(self, model, value):
        setattr(self._local(model), self.name, value)


def _is_overridden(hook, stage):
    return getattr(type(hook), stage) is not getattr(Hook, stage)


def _validate_hooks(hooks):
    if hooks is None:
        return ()
    if isinstance(hooks, Hook):
        hooks = [hooks]
    if isinstance(hooks, type) and issubclass(hooks, Hook):
        raise TypeError(
            "compile: `hooks` must be a list of keras_custom.Hook instances. "
            f"Received: hooks={hooks.__name__} (a class); write "
            f"hooks=[{hooks.__name__}(...)]"
        )
    try:
        hooks = list(hooks)
    except TypeError:
        raise TypeError(
            "compile: `hooks` must be a list of keras_custom.Hook instances. "
            f"Received: hooks={hooks!r}"
        ) from None
    seen = set()
    for i, hook in enumerate(hooks):
        if isinstance(hook, type) and issubclass(hook, Hook):
            raise TypeError(
                f"compile: `hooks[{i}]` is the class {hook.__name__}, not an instance. "
                f"Write {hook.__name__}(...). Received: hooks[{i}]={hook!r}"
            )
        if not isinstance(hook, Hook):
            raise TypeError(
                f"compile: `hooks[{i}]` must be a keras_custom.Hook instance. "
                f"Received: hooks[{i}]={hook!r} of type {type(hook).__name__}"
            )
        if id(hook) in seen:
            raise ValueError(
                f"compile: `hooks[{i}]` ({type(hook).__name__}) appears twice in "
                "`hooks`; pass separate instances."
            )
        seen.add(id(hook))
    return tuple(hooks)


class HookedTrainer:
    """The hook-aware parts of the train and test steps (backend-independent)."""

    _kc_hooks = ()
    _kc_trackers = None
    _kc_evaluating = False
    _kc_eval_names = None
    _kc_accumulator = None
    # The state of the step being traced, kept per thread: `MirroredStrategy`
    # traces each replica's step in a thread of its own, and the threads take
    # turns at every cross-replica point (an all-reduce, a `merge_call`).
    _kc_window = _PerThread(None)
    _kc_skips = _PerThread(None)
    _kc_loss_value = _PerThread(None)
    _kc_lso_finite = _PerThread(None)
    _kc_in_test = _PerThread(False)
    _kc_batch = _PerThread(None)
    _kc_mute = _PerThread(False)
    _kc_objective = _PerThread(None)
    _kc_symbolic = _PerThread(False)

    # ------------------------------------------------------------------ compile
    def compile(self, *args, hooks=None, **kwargs):
        """Configures the model for training, as `keras.Model.compile`, plus hooks.

        Args:
            *args: as `keras.Model.compile`.
            hooks: a list of `keras_custom.Hook` instances, run in list order at
                each stage of the train and test steps.
            **kwargs: as `keras.Model.compile`.

        A failed `compile` (a bad hook, a bad Keras argument, a hook pattern that
        matches no variable of a built model) leaves the model as it was.
        """
        hooks = _validate_hooks(hooks)
        saved = dict(self.__dict__)
        try:
            super().compile(*args, **kwargs)
            self._kc_set("_kc_hooks", hooks)
            self._kc_set("_kc_trackers", {})
            self._kc_set("_kc_eval_names", set())
            self._kc_set("_kc_accumulator", _take_accumulation(self.optimizer))
            for hook in hooks:
                owner = hook._context.model if hook._context is not None else None
                if owner is not None and owner is not self:
                    raise ValueError(
                        f"compile: {type(hook).__name__} is already attached to the "
                        f"model {owner.name!r}; a hook holds the state of one model. "
                        "Pass a new instance (e.g. `Hook.from_config(h.get_config())`)."
                    )
            for hook in hooks:  # built before (a recompile): its names stay declared
                for name, reduction in hook.__dict__.get("_kc_declared", {}).items():
                    self._kc_tracker(name, reduction)
            if self.built:
                self._kc_build_hooks()
        except Exception:
            for key in list(self.__dict__):
                if key not in saved:
                    object.__delattr__(self, key)
            for key, value in saved.items():
                object.__setattr__(self, key, value)
            raise

    @property
    def hooks(self):
        """The hooks given to `compile`, in the order they run."""
        return list(self._kc_hooks)

    def get_compile_config(self):
        config = super().get_compile_config()
        if config and self._kc_hooks:
            config["hooks"] = [
                serialization_lib.serialize_keras_object(h) for h in self._kc_hooks
            ]
        if config and self._kc_accumulator is not None:
            _put_accumulation(config.get("optimizer"), self._kc_accumulator.steps)
        return config

    @property
    def gradient_accumulation_steps(self):
        """`N` when the optimizer was given `gradient_accumulation_steps=N`.

        The model then accumulates the gradients itself, so that the gradient
        hooks see the accumulated gradient: the optimizer's own attribute reads
        `None` after `compile` (its saved config keeps `N`).
        """
        accumulator = self._kc_accumulator
        return None if accumulator is None else accumulator.steps

    @property
    def _kc_all_hooks(self):
        """The hooks, then the model's own state holders (the accumulator)."""
        extra = () if self._kc_accumulator is None else (self._kc_accumulator,)
        return tuple(self._kc_hooks) + extra

    def compile_from_config(self, config):
        config = serialization_lib.deserialize_keras_object(_public_optimizers(config))
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)
            self._kc_build_hooks()

    def _kc_set(self, name, value):
        object.__setattr__(self, name, value)

    # ------------------------------------------------------------------- build
    def _kc_build_hooks(self):
        """Builds every hook not built yet (eagerly, outside any compiled step)."""
        pending = [h for h in self._kc_all_hooks if not h.built]
        if not pending:
            return
        from keras_custom.backend import build_scope

        with build_scope(self):
            context = _StepContext(self)
            for hook in pending:
                hook._context = context
                hook._build(self)

    def _symbolic_build(self, *args, **kwargs):
        # Keras builds the compiled loss by tracing `compute_loss` symbolically
        # (JAX, PyTorch, TensorFlow under a strategy): hook terms stay out of it,
        # so a hook's stages run only in real steps, on every backend alike.
        self._kc_set("_kc_symbolic", True)
        try:
            super()._symbolic_build(*args, **kwargs)
        finally:
            self._kc_set("_kc_symbolic", False)
        self._kc_build_hooks()

    # ----------------------------------------------------------------- logging
    def _kc_tracker(self, name, reduction):
        tracker = self._kc_trackers.get(name)
        if tracker is None:
            from keras_custom.backend import build_scope

            with build_scope(self):
                if reduction == "sum":
                    tracker = keras.metrics.Sum(name=name)
                else:
                    tracker = keras.metrics.Mean(name=name)
            self._kc_trackers[name] = tracker
        return tracker

    def _kc_log(self, hook, name, value, reduction):
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"{type(hook).__name__}: `reduction` must be 'mean' or 'sum'. "
                f"Received: reduction={reduction!r}"
            )
        tracker = self._kc_tracker(name, reduction)
        if value is None:  # `declare_log`: remembered for a recompile
            hook.__dict__.setdefault("_kc_declared", {})[name] = reduction
            return
        if self._kc_mute:
            return
        if self._kc_in_test:
            self._kc_eval_names.add(name)
        if backend_dtype(value) != "float32":
            value = ops.cast(value, "float32")
        weight = self._kc_window
        if weight is not None:
            tracker.update_state(value, sample_weight=weight)
        else:
            tracker.update_state(value)

    @property
    def metrics(self):
        metrics = super().metrics
        if self.compiled and self._kc_trackers:
            metrics = metrics + list(self._kc_trackers.values())
        return metrics

    def get_metrics_result(self):
        result = super().get_metrics_result()
        if self._kc_evaluating and self._kc_trackers:
            for name in self._kc_trackers:
                if name not in self._kc_eval_names:
                    result.pop(name, None)
        return result

    def evaluate(self, *args, **kwargs):
        previous = self._kc_evaluating
        self._kc_set("_kc_evaluating", True)
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._kc_set("_kc_evaluating", previous)

    # ------------------------------------------------------------ hook checks
    def _kc_checked_hooks(self):
        return [h for h in self._kc_hooks if _is_overridden(h, "check")]

    def check_hooks(self):
        """Runs every hook's `check` (in Python), which may raise to stop training.

        `fit` and `train_on_batch` call it after each training call; call it
        yourself after each step of a hand-written loop that uses `apply_hooks`.
        """
        hooks = self._kc_checked_hooks()
        if not hooks:
            return
        self._kc_sync_state()
        for hook in hooks:
            hook.check(self)

    def _kc_sync_state(self):
        """Makes the variables current before a hook's `check` reads them (JAX
        keeps the state of `fit` outside the variables between syncs)."""
        sync = getattr(self, "jax_state_sync", None)
        if sync is not None and getattr(self, "_jax_state", None) is not None:
            sync()

    def fit(self, *args, **kwargs):
        if self._kc_checked_hooks():
            args = list(args)
            if len(args) > 5:  # fit(x, y, batch_size, epochs, verbose, callbacks)
                args[5] = _with_check(args[5])
            else:
                kwargs["callbacks"] = _with_check(kwargs.get("callbacks"))
        return super().fit(*args, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        logs = super().train_on_batch(*args, **kwargs)
        self.check_hooks()
        return logs

    # ----------------------------------------------------------- hook windows
    def _kc_run(self, hook, step, fn):
        """Runs one hook stage, with its window applied to what it logs."""
        if not hook.has_window or step is None:
            return fn(), None
        active = hook.is_active(step)
        previous = self._kc_window
        self._kc_set("_kc_window", ops.cast(active, "float32"))
        try:
            return fn(), active
        finally:
            self._kc_set("_kc_window", previous)

    def current_step(self):
        """The optimizer's step: updates applied so far (an integer tensor snapshot,
        of the dtype of `optimizer.iterations`: int64, or int32 on JAX)."""
        return self._kc_step()

    def _kc_step(self):
        """The optimizer's step before this update (a snapshot)."""
        if getattr(self, "optimizer", None) is None:
            return ops.convert_to_tensor(0, "int32")
        return ops.copy(self.optimizer.iterations)

    # ------------------------------------------------------------ loss stage
    def forward_pass(self, x, training):
        """Stage 1: the forward pass. Returns `y_pred`.

        (Not `forward`: on the PyTorch backend a model is a `torch.nn.Module`,
        whose `forward` Keras's layer call goes through.)
        """
        if self._call_has_training_arg:
            return self(x, training=training)
        return self(x)

    def _kc_forward_and_loss(self, x, y, sample_weight, training):
        """Stages 1 and 2 of either step: `(y_pred, loss)`."""
        y_pred = self.forward_pass(x, training=training)
        loss = self._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        return y_pred, loss

    def _kc_track_loss(self, x, loss):
        """Updates the `loss` tracker, as Keras's steps do (global batch value)."""
        self._loss_tracker.update_state(
            loss_module.unscale_loss_for_distribution(loss),
            sample_weight=self._kc_batch_size(x),
        )

    def _kc_batch_size(self, x):
        first = next(i for i in keras.tree.flatten(x) if i is not None)
        return ops.shape(first)[0]

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """Stage 2: the compiled loss, `model.losses`, and every hook's loss term.

        The same in the train and the test step, so `loss` and `val_loss` measure
        the same thing.
        """
        loss = super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        hooks = [h for h in self._kc_hooks if _is_overridden(h, "loss_term")]
        if not hooks or self._kc_symbolic:
            return loss
        self._kc_build_hooks()
        step = self._kc_step() if any(h.has_window for h in hooks) else None
        previous = self._kc_in_test
        self._kc_set("_kc_in_test", not training)
        try:
            for hook in hooks:
                term, active = self._kc_run(
                    hook,
                    step,
                    lambda: hook.loss_term(self, x, y, y_pred, sample_weight, training),
                )
                if term is None:
                    continue
                term = ops.cast(term, "float32")
                if active is not None:
                    term = ops.where(active, term, ops.zeros_like(term))
                term = loss_module.scale_loss_for_distribution(term)
                loss = term if loss is None else ops.add(loss, ops.cast(term, loss.dtype))
        finally:
            self._kc_set("_kc_in_test", previous)
        return loss

    # -------------------------------------------------------- gradient stages
    def process_gradients(self, grads, variables, step=None):
        """Stage 4: runs every hook's `process_gradients`, in list order.

        Args:
            grads: gradients, unscaled and aggregated, in the order of `variables`.
            variables: the trainable variables.
            step: the optimizer's step (defaults to `optimizer.iterations`).

        Returns:
            The processed gradients, same order.
        """
        if step is None:
            step = self._kc_step()
        grads = list(grads)
        variables = list(variables)
        for hook in self._kc_hooks:
            if not _is_overridden(hook, "process_gradients"):
                continue
            new, active = self._kc_run(
                hook, step, lambda: hook.process_gradients(grads, variables, step)
            )
            new = list(new) if new is not None else None
            if new is None or len(new) != len(grads):
                raise ValueError(
                    f"{type(hook).__name__}.process_gradients must return one gradient "
                    f"per variable ({len(grads)}). Received: "
                    f"{'None' if new is None else len(new)}"
                )
            if active is not None:
                new = [
                    g if (g is None or n is None) else ops.where(active, n, g)
                    for g, n in zip(grads, new)
                ]
            grads = new
        return grads

    def _kc_skip_update(self, hook, condition):
        if self._kc_skips is None:
            raise RuntimeError(
                f"{type(hook).__name__}: `skip_update` can only be called during a "
                "train step (from `process_gradients`)."
            )
        condition = ops.convert_to_tensor(condition)
        if self._kc_window is not None:
            condition = ops.logical_and(condition, ops.cast(self._kc_window, "bool"))
        self._kc_skips.append(condition)

    def apply_update(self, grads, variables, step):
        """Stage 5: the optimizer update, unless a hook asked to skip this step.

        A skipped step leaves the weights, the optimizer's slots and its step counter
        bit-identical. Under loss scaling (`LossScaleOptimizer`) a non-finite
        gradient skips the step and lowers the scale, as Keras does; a step a hook
        skipped with finite gradients leaves the scale as it was. The gradients are
        already summed over replicas: the optimizer does not sum them again.
        """
        optimizer = self.optimizer
        skip = None
        for condition in self._kc_skips or ():
            skip = condition if skip is None else ops.logical_or(skip, condition)
        lso = isinstance(optimizer, _LSO)
        inner = optimizer.inner_optimizer if lso else optimizer
        finite = self._kc_lso_finite if lso else None
        if finite is None and skip is None:
            self._kc_apply(inner, grads, variables)
            return
        if finite is None:
            finite = ops.convert_to_tensor(True)
        go = finite if skip is None else ops.logical_and(finite, ops.logical_not(skip))

        def apply(finite, grads):
            self._kc_apply(inner, grads, variables)
            if lso:
                _lso_on_finite(optimizer)

        def no_apply(finite, grads):
            if lso:
                ops.cond(finite, lambda: None, lambda: _lso_on_nonfinite(optimizer))

        self._kc_cond(go, apply, no_apply, finite, list(grads))

    # The three places where a backend may differ in how it runs the generic
    # stages (TensorFlow overrides them for `tf.distribute` strategies).
    def _kc_aggregate(self, grads, loss):
        """Sums the gradients and the loss over replicas (once, before the hooks)."""
        return grads, loss

    def _kc_apply(self, optimizer, grads, variables):
        """`optimizer.apply` for gradients that are already aggregated."""
        optimizer.apply(grads, variables)

    def _kc_cond(self, pred, true_fn, false_fn, *args):
        """`ops.cond` for branches that update state; returns nothing.

        `args` are passed to the branch that runs (a backend may have to move
        them, e.g. across the replicas of a `tf.distribute` strategy).
        """
        ops.cond(pred, lambda: true_fn(*args), lambda: false_fn(*args))

    def loss_scale_overflow(self):
        """Whether this step's scaled gradients overflowed (NaN or Inf).

        Under loss scaling (`LossScaleOptimizer`, e.g. `mixed_float16`) such a step
        is skipped by the model itself and the scale is lowered: it is the loss
        scale's normal way to find its value. Call it from `process_gradients`;
        it returns a boolean tensor during a train step under loss scaling, and
        `None` otherwise (no loss scaling, or outside a train step).
        """
        finite = self._kc_lso_finite
        return None if finite is None else ops.logical_not(finite)

    def after_update(self, step):
        """Stage 6: runs every hook's `after_update`, in list order."""
        for hook in self._kc_hooks:
            if _is_overridden(hook, "after_update"):
                self._kc_run(hook, step, lambda: hook.after_update(self, step))

    def _kc_unscale(self, grads, record=True):
        """Undoes the loss scale of a `LossScaleOptimizer` (no-op otherwise)."""
        optimizer = self.optimizer
        if not isinstance(optimizer, _LSO):
            if record:
                self._kc_set("_kc_lso_finite", None)
            return list(grads)
        scale = optimizer.dynamic_scale
        grads = [
            None if g is None else ops.divide(g, ops.cast(scale, g.dtype)) for g in grads
        ]
        if record:
            self._kc_set("_kc_lso_finite", optimizer.check_finite(grads))
        return grads

    @contextlib.contextmanager
    def _kc_muted(self):
        """Nothing is logged inside (a second pass must not count twice)."""
        previous = self._kc_mute
        self._kc_set("_kc_mute", True)
        try:
            yield
        finally:
            self._kc_set("_kc_mute", previous)

    def gradients_at_current_weights(self, variables=None, objective=None):
        """Gradients of this step's loss at the variables' current values.

        For hooks that need a second backward pass on the same batch (e.g.
        `SharpnessAware`): call it from `process_gradients` after changing the
        weights. The gradients are unscaled and aggregated like those the hooks
        receive; nothing is logged and no metric is updated.

        Args:
            variables: the variables to differentiate (default: all trainable).
            objective: any value; `model.objective` returns it while this pass
                runs, so that an overridden `compute_loss` can return another
                loss (the generator's loss of a GAN, say; `docs/two-players.md`).

        Returns:
            `(grads, loss)`.
        """
        if self._kc_batch is None:
            raise RuntimeError(
                "gradients_at_current_weights() can only be called during a train "
                "step of `fit`/`train_on_batch` (from a hook's `process_gradients`)."
            )
        if variables is None:
            variables = self.trainable_variables
        x, y, sample_weight = self._kc_batch
        previous = self._kc_objective
        self._kc_set("_kc_objective", objective)
        try:
            return self._kc_gradients(x, y, sample_weight, list(variables))
        finally:
            self._kc_set("_kc_objective", previous)

    @property
    def objective(self):
        """Which loss `compute_loss` is asked for.

        `None` in the train and test steps' own pass; during
        `gradients_at_current_weights(..., objective=o)`, `o`.
        """
        return self._kc_objective

    def log_value(self, name, value, reduction="mean"):
        """Reports a scalar from a stage the model overrides, as `Hook.log` does.

        The epoch value is the mean of the steps' values (`reduction="sum"`: their
        sum). Call `log_value(name, None)` once before the first step (from
        `build`, say) to create the tracker outside the compiled step.
        """
        self._kc_log(self, name, value, reduction)

    @contextlib.contextmanager
    def _kc_batch_scope(self, batch):
        """This step's `(x, y, sample_weight)`, for `gradients_at_current_weights`."""
        self._kc_set("_kc_batch", batch)
        try:
            yield
        finally:
            self._kc_set("_kc_batch", None)

    def _kc_update(self, loss, grads, variables, batch=None):
        """Stages 4-6 for gradients of the (scaled) loss, as the tape gave them.

        The gradients and the loss are summed over replicas once, then unscaled;
        with gradient accumulation they are added to the accumulators, and the
        stages run on their mean every `gradient_accumulation_steps` calls.
        `batch` is the step's data, which a second pass re-reads (`None` in a
        hand-written loop).
        """
        if batch is not None:
            with self._kc_batch_scope(batch):
                return self._kc_update(loss, grads, variables)
        self._kc_build_hooks()
        if not optimizer_is_built(self.optimizer):
            self.optimizer.build(variables)
        grads, loss = self._kc_aggregate(list(grads), loss)
        grads = self._kc_unscale(grads, record=False)
        accumulator = self._kc_accumulator
        if accumulator is None:
            return self._kc_stages(grads, loss, variables)
        grads, loss, ready = accumulator.add(grads, loss)

        def update(grads, loss):
            self._kc_stages(grads, loss, variables)

        self._kc_cond(ready, update, lambda grads, loss: None, grads, loss)
        return grads

    def _kc_stages(self, grads, loss, variables):
        """Stages 4-6 on unscaled, aggregated (accumulated) gradients."""
        optimizer = self.optimizer
        finite = optimizer.check_finite(grads) if isinstance(optimizer, _LSO) else None
        step = self._kc_step()
        self._kc_set("_kc_skips", [])
        self._kc_set("_kc_loss_value", loss)
        self._kc_set("_kc_lso_finite", finite)
        try:
            grads = self.process_gradients(grads, variables, step)
            self.apply_update(grads, variables, step)
            self.after_update(step)
        finally:
            self._kc_set("_kc_skips", None)
            self._kc_set("_kc_loss_value", None)
            self._kc_set("_kc_lso_finite", None)
        return grads

    def apply_hooks(self, grads, variables=None):
        """The second half of the train step, for a hand-written training loop.

        Runs the gradient hooks, the optimizer update (skipped where a guard asked
        for it) and the after-update hooks, as `fit` would.

        Args:
            grads: gradients of the loss, in the order of `variables`. Scaled
                gradients of a `LossScaleOptimizer` (from `optimizer.scale_loss`)
                are unscaled first.
            variables: defaults to `model.trainable_variables`.

        Returns:
            The gradients as the optimizer received them.

        Example:

        ```python
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        model.apply_hooks(grads)
        ```
        """
        if variables is None:
            variables = self.trainable_variables
        return self._kc_update(None, list(grads), list(variables))


class _CheckHooks(keras.callbacks.Callback):
    """Runs `model.check_hooks()` after each training batch of `fit`."""

    def on_train_batch_end(self, batch, logs=None):
        self.model.check_hooks()


def _with_check(callbacks):
    if isinstance(callbacks, keras.callbacks.CallbackList):
        if not any(isinstance(c, _CheckHooks) for c in callbacks.callbacks):
            check = _CheckHooks()
            if callbacks.model is not None:
                check.set_model(callbacks.model)
            callbacks.callbacks.append(check)
            callbacks._async_train = False  # the check must run in this thread
        return callbacks
    callbacks = list(callbacks or [])
    if not any(isinstance(c, _CheckHooks) for c in callbacks):
        callbacks.append(_CheckHooks())
    return callbacks


class _GradientAccumulation(Hook):
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

    def add(self, grads, loss):
        """Adds one micro-step; returns `(mean grads, mean loss, ready)`."""
        if len(grads) != len(self.sums):
            raise ValueError(
                "Gradient accumulation: the model has "
                f"{len(grads)} trainable variables, the accumulators were built for "
                f"{len(self.sums)}. Recompile after changing which weights train."
            )
        count = ops.add(self.count, 1)
        ready = ops.greater_equal(count, self.steps)
        self.count.assign(ops.where(ready, ops.zeros_like(count), count))
        means = []
        for total, g in zip(self.sums, grads):
            if g is None:
                means.append(None)
                continue
            new = ops.add(total, ops.cast(g, total.dtype))
            total.assign(ops.where(ready, ops.zeros_like(new), new))
            means.append(ops.divide(new, ops.cast(self.steps, new.dtype)))
        if loss is not None:
            new = ops.add(self.loss_sum, ops.cast(loss, "float32"))
            self.loss_sum.assign(ops.where(ready, ops.zeros_like(new), new))
            loss = ops.divide(new, float(self.steps))
        return means, loss, ready


def _inner_of(optimizer):
    return optimizer.inner_optimizer if isinstance(optimizer, _LSO) else optimizer


def _take_accumulation(optimizer):
    """Takes over the optimizer's `gradient_accumulation_steps` (see the property)."""
    inner = _inner_of(optimizer) if optimizer is not None else None
    if inner is None:
        return None
    steps = getattr(inner, "gradient_accumulation_steps", None) or getattr(
        inner, "_kc_accumulation_steps", None
    )
    if not steps:
        return None
    own = getattr(inner, "gradient_accumulation_steps", None)
    if own and getattr(inner, "built", False):
        raise ValueError(
            "compile: an optimizer with `gradient_accumulation_steps` must not be "
            "built yet (the model accumulates the gradients itself so that hooks "
            "see the accumulated gradient). Pass a new optimizer. Received: "
            f"gradient_accumulation_steps={steps}"
        )
    object.__setattr__(inner, "_kc_accumulation_steps", steps)
    inner.gradient_accumulation_steps = None
    return _GradientAccumulation(steps)


def _put_accumulation(config, steps):
    """Writes `gradient_accumulation_steps` back into a serialized optimizer."""
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        return
    inner = config["config"].get("inner_optimizer")
    if config.get("class_name") == "LossScaleOptimizer" and isinstance(inner, dict):
        _put_accumulation(inner, steps)
    else:
        config["config"]["gradient_accumulation_steps"] = steps


def _public_optimizers(config):
    """Names optimizers by their public class (`keras.optimizers.Adam`).

    Under PyTorch, `keras.optimizers.Adam` is `keras.src.backend.torch.optimizers.
    torch_adam.Adam`, and Keras writes that module into the compile config: the
    file would then load the PyTorch class under TensorFlow or JAX and fail in the
    first step. The public name resolves to the loading backend's class.
    """
    if isinstance(config, dict):
        module = config.get("module")
        if (
            isinstance(module, str)
            and module.startswith("keras.src.backend.")
            and ".optimizers" in module
        ):
            config = dict(config, module="keras.optimizers")
        return {key: _public_optimizers(value) for key, value in config.items()}
    if isinstance(config, list):
        return [_public_optimizers(value) for value in config]
    return config


def backend_dtype(value):
    """The standardized dtype of a tensor or a Python number."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return None
    return keras.backend.standardize_dtype(dtype)


def optimizer_is_built(optimizer):
    return getattr(optimizer, "built", False)


def _lso_on_finite(optimizer):
    def upscale():
        optimizer.step_counter.assign(0)
        optimizer.dynamic_scale.assign(ops.multiply(optimizer.dynamic_scale, 2.0))

    def increment():
        optimizer.step_counter.assign_add(1)

    ops.cond(
        ops.equal(optimizer.step_counter, optimizer.dynamic_growth_steps - 1),
        upscale,
        increment,
    )


def _lso_on_nonfinite(optimizer):
    optimizer.step_counter.assign(0)
    optimizer.dynamic_scale.assign(ops.multiply(optimizer.dynamic_scale, 0.5))
