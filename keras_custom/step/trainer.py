"""`Trainer`: the staged train and test steps, written once with `keras.ops`.

`Trainer` is mixed in before a Keras model class (`kc.Model`, `kc.Sequential`, or the
class of a model given to `kc.attach`). It owns `compile(hooks=...)`, the stages of a
step and the two steps themselves. A train step runs:

1. `forward_pass(x, training)`
2. `compute_loss(...)`: the compiled loss, `model.losses` and every hook's loss term
3. the gradients (`_kc_loss_and_grads`, the backend's part), or stages 1-3 by the
   one hook that takes them over (`Hook.compute_gradients`)
4. `process_gradients(grads, variables, step)`: every hook, in list order
5. `apply_update(grads, variables, step)`: the optimizer, unless a hook asked to skip
6. `after_update(step)`: every hook, in list order

then the metrics. The test step runs stages 1 and 2. Each stage is a method a model
class can override without rewriting the others.

What differs per backend lives in `keras_custom/backend/<name>.py`, a class that
inherits this one and overrides the methods marked "backend" below: how gradients
are taken, how a conditional update runs, how replicas are summed (TensorFlow) and
how state is threaded through the compiled step (JAX). What a step knows is one
`StepState` (`keras_custom/step/state.py`); what a model keeps between steps is one
`Pipeline` (`keras_custom/step/pipeline.py`).
"""

import contextlib
import inspect
import warnings

import keras
from keras import ops

from keras_custom import _keras
from keras_custom.step import accumulation
from keras_custom.step import loss_scale
from keras_custom.step import saving
from keras_custom.step.pipeline import Pipeline
from keras_custom.step.pipeline import validate_hooks
from keras_custom.step.state import StepState

KEEP = object()  # `compile()` without `hooks=`: the model keeps its hooks

# Our own classes: a method defined here is not the user's override.
_OWN_MODULE_PREFIX = "keras_custom."


class _CheckHooks(keras.callbacks.Callback):
    """Runs `model.check_hooks()` after each training batch of `fit`."""

    def on_train_batch_end(self, batch, logs=None):
        self.model.check_hooks()


class Trainer(_keras.SymbolicBuild):
    """The hook-aware train and test steps, shared by every backend."""

    _kc = None  # the model's `Pipeline`, set by `compile` or `kc.attach`

    # ================================================================== compile
    def compile(self, *args, hooks=KEEP, **kwargs):
        """Configures the model for training, as `keras.Model.compile`, plus hooks.

        Args:
            *args: as `keras.Model.compile`.
            hooks: a list of `keras_custom.Hook` instances, run in list order at
                each stage of the train and test steps. Not given: the model keeps
                the hooks it has; `[]` removes them.
            **kwargs: as `keras.Model.compile`.

        A failed `compile` (a bad hook, a bad Keras argument, a hook pattern that
        matches no variable of a built model, a log name that is taken) leaves the
        model as it was.
        """
        new = self.hooks if hooks is KEEP else validate_hooks(hooks)
        with attributes_kept_on_error(self):
            super().compile(*args, **kwargs)
            self._kc_install(new, accumulation.take_over(self.optimizer))

    @property
    def hooks(self):
        """The hooks, in the order they run."""
        return list(self._kc.hooks) if self._kc is not None else []

    def _kc_attach(self, hooks):
        """Makes `hooks` the model's hooks without compiling (`kc.attach`)."""
        pipeline = self._kc
        if pipeline is not None:
            accumulator = pipeline.accumulator
        elif self.compiled and getattr(self, "optimizer", None) is not None:
            accumulator = accumulation.take_over(self.optimizer)
        else:
            accumulator = None
        self._kc_install(hooks, accumulator)

    def _kc_install(self, hooks, accumulator):
        """Makes `hooks` the model's hooks (a new `Pipeline`); builds them if the
        model is built. Raises before changing anything the caller restores."""
        for i, hook in enumerate(hooks):
            owner = hook._owner()
            if owner is not None and owner is not self:
                raise ValueError(
                    f"`hooks[{i}]` ({type(hook).__name__}(name={hook.name!r})) is "
                    f"already attached to the model {owner.name!r}; a hook holds the "
                    "state of one model. Pass a new instance (e.g. "
                    "`type(h).from_config(h.get_config())`)."
                )
        pipeline = Pipeline(hooks, accumulator, self._kc_build_scope)
        if self.compiled:
            pipeline.compiled_names = saving.compiled_metric_names(
                self.get_compile_config()
            )
        reserved = self._kc_reserved_names(pipeline)
        for hook in pipeline.hooks:
            for name, reduction in hook._declared.items():
                pipeline.logs.claim(hook, name, reduction, reserved)
        object.__setattr__(self, "_kc", pipeline)
        for hook in hooks:
            hook._set_owner(self)
        if self.built and getattr(self, "optimizer", None) is not None:
            self._kc_build_hooks()

    def get_compile_config(self):
        config = saving.public_optimizers(super().get_compile_config())
        pipeline = self._kc
        if config and pipeline is not None and pipeline.accumulator is not None:
            accumulation.write_steps(config.get("optimizer"), pipeline.accumulator.steps)
        return config

    def compile_from_config(self, config):
        if self._kc_overridden_by_user("compile"):
            # As Keras does: a custom `compile` may not take the saved arguments.
            warnings.warn(
                "`compile()` was not called as part of model loading because the "
                "model's `compile()` method is custom. All subclassed Models that "
                "have `compile()` overridden should also override "
                "`get_compile_config()` and `compile_from_config(config)`. "
                "Alternatively, you can call `compile()` manually after loading.",
                stacklevel=2,
            )
            return
        config = keras.saving.deserialize_keras_object(saving.public_optimizers(config))
        hooks = config.pop("hooks", KEEP)  # files of keras_custom 0.1
        self.compile(**config, hooks=hooks)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)
            self._kc_build_hooks()

    @property
    def gradient_accumulation_steps(self):
        """`N` when the optimizer was given `gradient_accumulation_steps=N`.

        The model then accumulates the gradients itself, so that the gradient
        hooks see the accumulated gradient: the optimizer's own attribute reads
        `None` after `compile` (its saved config keeps `N`).
        """
        pipeline = self._kc
        if pipeline is None or pipeline.accumulator is None:
            return None
        return pipeline.accumulator.steps

    @property
    def _kc_accumulator(self):
        # Where the accumulator's state sits in `.keras` files since 0.1.
        return None if self._kc is None else self._kc.accumulator

    def _kc_retrace(self):
        """Traces the train and test steps again at their next call (a hook's
        term that the compiled step left out is needed now)."""
        if getattr(self, "train_function", None) is not None:
            self.make_train_function(force=True)
        if getattr(self, "test_function", None) is not None:
            self.make_test_function(force=True)

    def _kc_overridden_by_user(self, name):
        """Whether a class other than Keras's and ours defines method `name`."""
        for klass in type(self).__mro__:
            if name not in klass.__dict__:
                continue
            module = klass.__module__ or ""
            if module.startswith(_OWN_MODULE_PREFIX):
                continue
            return not (module == "keras" or module.startswith("keras."))
        return False

    # ==================================================================== build
    def _kc_build_hooks(self):
        """Builds every hook not built yet (eagerly, outside any compiled step),
        then creates the trackers of the names they log."""
        pipeline = self._kc
        if pipeline is None or pipeline.built or not self.built:
            return
        pending = [h for h in pipeline.all_hooks if not h.built]
        if pending:
            with self._kc_build_scope():
                for hook in pending:
                    hook._build(self)
            reserved = self._kc_reserved_names()
            for hook in pipeline.hooks:
                for name, reduction in hook._declared.items():
                    pipeline.logs.claim(hook, name, reduction, reserved)
        for name in pipeline.logs.owners:
            pipeline.logs.tracker(name)
        pipeline.built = True

    def _kc_symbolic_scope(self):
        """While Keras builds the model symbolically: hooks take no part."""
        return StepState(self, training=False, symbolic=True)

    def _kc_after_symbolic_build(self):
        """After Keras built the model, its metrics and the optimizer, outside any
        compiled function: the hooks are built there, so that their state exists
        before the step is compiled (JAX threads it through the step)."""
        if getattr(self, "optimizer", None) is not None:
            self._kc_build_hooks()

    def _kc_reserved_names(self, pipeline=None):
        """`loss` and the names of the model's compiled metrics (as logged)."""
        pipeline = pipeline or self._kc
        names = {"loss"}
        if pipeline is not None:
            names |= pipeline.compiled_names
        for metric in super().metrics:  # Keras's own metrics, not the hooks' logs
            names.add(metric.name)
            if getattr(metric, "built", True):
                result = metric.result()  # a container's names (`a_mae`, ...)
                if isinstance(result, dict):
                    names.update(result)
        return names

    # ============================================================ logs, metrics
    @property
    def metrics(self):
        metrics = super().metrics
        pipeline = self._kc
        if pipeline is not None and pipeline.logs.trackers and self.compiled:
            metrics = metrics + list(pipeline.logs.trackers.values())
        return metrics

    def get_metrics_result(self):
        result = super().get_metrics_result()
        pipeline = self._kc
        if pipeline is not None and pipeline.evaluating:
            for name in pipeline.logs.trackers:
                if name not in pipeline.logs.test_names:
                    result.pop(name, None)
        return result

    def evaluate(self, *args, **kwargs):
        pipeline = self._kc
        if pipeline is None:
            return super().evaluate(*args, **kwargs)
        previous = pipeline.evaluating
        pipeline.evaluating = True
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            pipeline.evaluating = previous

    def log_value(self, name, value, reduction="mean"):
        """Reports a scalar from a stage the model overrides, as `Hook.log` does.

        The epoch value is the mean of the steps' values (`reduction="sum"`: their
        sum). `log_value(name, None)` declares the name before the first step
        (from `compile`, say), which is only needed on JAX outside `fit`.
        """
        pipeline = self._kc
        if pipeline is None:
            raise RuntimeError(f"log_value({name!r}, ...): compile the model first.")
        if value is None:
            pipeline.logs.claim(self, name, reduction, self._kc_reserved_names())
            pipeline.logs.tracker(name)
            return
        state = StepState.current()
        if state is None:
            raise RuntimeError(
                f"log_value({name!r}, ...) can only be called during a step."
            )
        self._kc_log(state, self, name, value, reduction)

    def _kc_log(self, state, owner, name, value, reduction):
        """Records one logged value of `owner` in this step."""
        logs = self._kc.logs
        if logs.owners.get(name) is not owner:
            logs.claim(owner, name, reduction, self._kc_reserved_names())
        if not state.training:
            logs.test_names.add(name)
        if state.muted:
            return
        if name not in logs.trackers:
            self._kc_new_tracker_in_step(name)
        logs.update(name, self._kc_detach(value), state.log_weight)

    def _kc_new_tracker_in_step(self, name):
        """A tracker first needed inside a step (backend: JAX cannot)."""
        self._kc.logs.tracker(name)

    # ================================================================== checks
    def check_hooks(self):
        """Runs every hook's `check` (in Python), which may raise to stop training.

        `fit` and `train_on_batch` call it after each training call; call it
        yourself after each step of a hand-written loop that uses `apply_hooks`.
        """
        pipeline = self._kc
        if pipeline is None or not pipeline.stage_hooks["check"]:
            return
        self._kc_sync_state()
        for hook in pipeline.stage_hooks["check"]:
            hook.check(self)

    def _kc_sync_state(self):
        """Makes the variables current before a hook's `check` reads them
        (backend: JAX keeps the state of `fit` outside the variables)."""

    def fit(self, *args, **kwargs):
        pipeline = self._kc
        if pipeline is not None:
            first = [c for hook in pipeline.hooks for c in hook.callbacks()]
            last = [_CheckHooks()] if pipeline.stage_hooks["check"] else []
            if first or last:
                args = list(args)
                # Where `callbacks` sits in the `fit` we call: Keras's (x, y,
                # batch_size, epochs, verbose, callbacks), or that of the class of
                # an attached model (a KerasHub task's `fit` takes it by keyword).
                index = _callbacks_index(super().fit)
                if index is not None and len(args) > index:
                    args[index] = _with_callbacks(args[index], first, last)
                else:
                    kwargs["callbacks"] = _with_callbacks(
                        kwargs.get("callbacks"), first, last
                    )
        return super().fit(*args, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        logs = super().train_on_batch(*args, **kwargs)
        self.check_hooks()
        return logs

    # ================================================================ the steps
    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        return self._kc_train(x, y, sample_weight)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        return self._kc_test(x, y, sample_weight)

    def _kc_train(self, x, y, sample_weight, **state_kwargs):
        """One train step on a batch: every stage, then the metrics."""
        self._kc_build_hooks()
        with StepState(self, True, (x, y, sample_weight), **state_kwargs) as state:
            if self._kc_may_roll_back():
                state.snapshot = self._kc_snapshot(self.non_trainable_variables)
            y_pred, loss, grads, variables = self._kc_gradients(x, y, sample_weight)
            self._kc_track_loss(x, loss)
            if variables:
                self._kc_update(state, loss, grads, variables)
            else:
                warnings.warn("The model does not have any trainable weights.")
            return self._kc_metrics(x, y, y_pred, sample_weight)

    def _kc_test(self, x, y, sample_weight, **state_kwargs):
        """One test step on a batch: the forward pass, the loss, the metrics."""
        self._kc_build_hooks()
        with StepState(self, False, (x, y, sample_weight), **state_kwargs):
            y_pred, loss = self._kc_forward_and_loss(x, y, sample_weight, False)
            self._kc_track_loss(x, loss)
            return self._kc_metrics(x, y, y_pred, sample_weight)

    def _kc_metrics(self, x, y, y_pred, sample_weight):
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        pipeline = self._kc
        if pipeline is not None and not pipeline.names_checked:
            # The compiled metrics are built now (on TensorFlow, in this first
            # step): check once that no hook's log took one of their names.
            reserved = self._kc_reserved_names()
            for name, owner in pipeline.logs.owners.items():
                pipeline.logs.claim(owner, name, pipeline.logs.reductions[name], reserved)
            pipeline.names_checked = True
        return logs

    def _kc_gradients(self, x, y, sample_weight, variables=None):
        """Stages 1-3: the backend's `_kc_loss_and_grads`, or the `compute_gradients`
        of the hook that takes them over. Returns `(y_pred, loss, grads,
        variables)`."""
        pipeline = self._kc
        hook = None if pipeline is None else pipeline.gradient_hook
        if hook is None:
            return self._kc_loss_and_grads(x, y, sample_weight, variables)
        state = StepState.current()
        if state is not None:
            state.gradient_hook = hook
        y_pred, loss, grads = hook.compute_gradients(self, x, y, sample_weight, variables)
        if variables is None:
            variables = self.trainable_variables
        grads = list(grads)
        if len(grads) != len(variables):
            raise ValueError(
                f"{type(hook).__name__}.compute_gradients must return one gradient "
                f"per variable ({len(variables)}). Received: {len(grads)}"
            )
        return y_pred, self._kc_detach(loss), grads, list(variables)

    def _kc_may_roll_back(self):
        """Whether a step must keep what a skipped update restores."""
        pipeline = self._kc
        return (
            pipeline is not None
            and bool(pipeline.stage_hooks["process_gradients"])
            and pipeline.may_skip is not False
        )

    def _kc_forward_and_loss(self, x, y, sample_weight, training):
        """Stages 1 and 2 of either step: `(y_pred, loss)`."""
        y_pred = self.forward_pass(x, training=training)
        loss = _keras.compute_loss(self, x, y, y_pred, sample_weight, training)
        return y_pred, loss

    def _kc_track_loss(self, x, loss):
        """Updates the `loss` tracker, as Keras's steps do (global batch value)."""
        _keras.loss_tracker(self).update_state(
            _keras.unscale_loss_for_distribution(loss),
            sample_weight=self._kc_batch_size(x),
        )

    def _kc_batch_size(self, x):
        first = next(i for i in keras.tree.flatten(x) if i is not None)
        return ops.shape(first)[0]

    # ====================================================== stage 1: forward
    def forward_pass(self, x, training):
        """Stage 1: the forward pass. Returns `y_pred`.

        (Not `forward`: on the PyTorch backend a model is a `torch.nn.Module`,
        whose `forward` Keras's layer call goes through.)
        """
        if _keras.call_has_training_arg(self):
            return self(x, training=training)
        return self(x)

    # ========================================================= stage 2: loss
    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """Stage 2: the compiled loss, `model.losses`, and every hook's loss term.

        The same in the train and the test step, so `loss` and `val_loss` measure
        the same thing. Called from a hand-written loop, it adds the terms too (and
        what the hooks log there counts); not while Keras builds the compiled loss
        symbolically.
        """
        loss = self._kc_base_loss(x, y, y_pred, sample_weight, training)
        pipeline = self._kc
        if pipeline is None or not pipeline.stage_hooks["loss_term"]:
            return loss
        state = StepState.current()
        if state is None:  # a hand-written loop
            with StepState(self, training, (x, y, sample_weight)):
                return self._kc_add_loss_terms(
                    loss, x, y, y_pred, sample_weight, training
                )
        if state.symbolic or state.model is not self:
            return loss
        return self._kc_add_loss_terms(loss, x, y, y_pred, sample_weight, training)

    def _kc_add_loss_terms(self, loss, x, y, y_pred, sample_weight, training):
        """Adds every hook's loss term to `loss` (in the current `StepState`)."""
        pipeline = self._kc
        state = StepState.current()
        self._kc_build_hooks()  # a model built by this very call (TensorFlow)
        hooks = pipeline.stage_hooks["loss_term"]
        step = self._kc_step() if any(h.has_window for h in hooks) else None
        for hook in hooks:
            term, active = self._kc_run(
                state,
                hook,
                step,
                lambda: hook.loss_term(self, x, y, y_pred, sample_weight, training),
            )
            if term is None:
                continue
            term = ops.cast(term, "float32")
            if active is not None:
                term = ops.where(active, term, ops.zeros_like(term))
            term = _keras.scale_loss_for_distribution(term)
            loss = term if loss is None else ops.add(loss, ops.cast(term, loss.dtype))
        return loss

    def _kc_base_loss(self, x, y, y_pred, sample_weight, training):
        parent = super().compute_loss
        if _takes_training(parent):
            return parent(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
            )
        return parent(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)

    # ===================================================== stages 4 to 6
    def _kc_update(self, state, loss, grads, variables):
        """Stages 4-6 for the gradients of the (scaled) loss, as taken.

        The gradients and the loss are summed over replicas once, then unscaled;
        with gradient accumulation they are added to the accumulators, and the
        stages run on their mean every `gradient_accumulation_steps` calls.
        Returns the gradients the optimizer received (the mean, accumulating).
        """
        self._kc_build_hooks()
        optimizer = self.optimizer
        if not getattr(optimizer, "built", False):
            optimizer.build(variables)
        grads, loss = self._kc_aggregate(list(grads), loss)
        grads = loss_scale.unscale(optimizer, grads)
        accumulator = self._kc.accumulator if self._kc is not None else None
        if accumulator is None:
            return self._kc_stages(grads, loss, variables)
        grads, loss, ready = accumulator.add(grads, loss)

        def update(grads, loss):
            self._kc_stages(grads, loss, variables)

        self._kc_cond(ready, update, lambda grads, loss: None, grads, loss)
        return grads

    def _kc_stages(self, grads, loss, variables):
        """Stages 4-6 on unscaled, aggregated (accumulated) gradients."""
        state = StepState.current()
        optimizer = self.optimizer
        step = self._kc_step()
        with state.scoped(
            step=step,
            loss=loss,
            loss_scale_finite=loss_scale.finite(optimizer, grads),
            skips=[],
            log_weight=self._kc_replica_share(),
        ):
            kept = ()
            if self._kc_may_roll_back():
                kept = self._kc_snapshot(self._kc.rollback_variables())
            grads = self.process_gradients(grads, variables, step)
            self.apply_update(grads, variables, step)
            self.after_update(step)
            self._kc_roll_back(state, kept)
            if self._kc.may_skip is None:  # learnt from the first step
                self._kc.may_skip = bool(state.skips)
        return grads

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
        pipeline = self._kc
        if pipeline is None:
            return grads
        state = StepState.current()
        for hook in pipeline.stage_hooks["process_gradients"]:
            new, active = self._kc_run(
                state, hook, step, lambda: hook.process_gradients(grads, variables, step)
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

    def apply_update(self, grads, variables, step):
        """Stage 5: the optimizer update, unless a hook asked to skip this step.

        A skipped step leaves the weights, the optimizer's slots and its step counter
        bit-identical. Under loss scaling (`LossScaleOptimizer`) a non-finite
        gradient skips the step and lowers the scale, as Keras does; a step a hook
        skipped with finite gradients leaves the scale as it was. The gradients are
        already summed over replicas: the optimizer does not sum them again.
        """
        state = StepState.current()
        optimizer = self.optimizer
        inner = loss_scale.inner(optimizer)
        go = state.should_apply() if state is not None else None
        if go is None:
            self._kc_apply(inner, grads, variables)
        else:

            def apply(grads):
                self._kc_apply(inner, grads, variables)

            self._kc_cond(go, apply, lambda grads: None, list(grads))
        finite = state.loss_scale_finite if state is not None else None
        if finite is not None:
            loss_scale.update_scale(optimizer, finite, go)

    def after_update(self, step):
        """Stage 6: runs every hook's `after_update`, in list order."""
        pipeline = self._kc
        if pipeline is None:
            return
        state = StepState.current()
        for hook in pipeline.stage_hooks["after_update"]:
            self._kc_run(state, hook, step, lambda: hook.after_update(self, step))

    def _kc_roll_back(self, state, kept):
        """Undoes what a step changed where its update was not applied.

        Where a hook asked to skip: the model's non-trainable variables
        (BatchNormalization's statistics), as they were before the forward pass.
        Where no update was applied (a skip, or a loss-scale overflow): the hooks'
        state, as it was before the gradient stages.
        """
        skip = state.skip_requested()
        if skip is not None:
            for variable, before in state.snapshot:
                variable.assign(ops.where(skip, before, variable.value))
        go = state.should_apply()
        if go is not None:
            for variable, before in kept:
                variable.assign(ops.where(go, variable.value, before))

    def _kc_run(self, state, hook, step, fn):
        """Runs one hook stage, with its window applied to what it logs."""
        if not hook.has_window or step is None:
            return fn(), None
        active = hook.is_active(step)
        weight = ops.cast(active, "float32")
        if state.log_weight is not None:
            weight = ops.multiply(weight, state.log_weight)
        with state.scoped(log_weight=weight, active=active):
            return fn(), active

    # =================================================== for hooks and users
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
        self._kc_build_hooks()
        with StepState(self, True) as state:
            return self._kc_update(state, None, list(grads), list(variables))

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
        state = StepState.current()
        if state is None or state.batch is None:
            raise RuntimeError(
                "gradients_at_current_weights() can only be called during a train "
                "step of `fit`/`train_on_batch` (from a hook's `process_gradients`)."
            )
        if variables is None:
            variables = self.trainable_variables
        x, y, sample_weight = state.batch
        with state.scoped(objective=objective, muted=True):
            _, loss, grads, _ = self._kc_gradients(x, y, sample_weight, list(variables))
        grads, loss = self._kc_aggregate(list(grads), loss)
        return loss_scale.unscale(self.optimizer, grads), loss

    @property
    def objective(self):
        """Which loss `compute_loss` is asked for.

        `None` in the train and test steps' own pass; during
        `gradients_at_current_weights(..., objective=o)`, `o`.
        """
        state = StepState.current()
        return None if state is None else state.objective

    def loss_scale_overflow(self):
        """Whether this step's scaled gradients overflowed (NaN or Inf).

        Under loss scaling (`LossScaleOptimizer`, e.g. `mixed_float16`) such a step
        is skipped by the model itself and the scale is lowered: it is the loss
        scale's normal way to find its value. Call it from `process_gradients`;
        it returns a boolean tensor during a train step under loss scaling, and
        `None` otherwise (no loss scaling, or outside a train step).
        """
        state = StepState.current()
        finite = None if state is None else state.loss_scale_finite
        return None if finite is None else ops.logical_not(finite)

    def current_step(self):
        """The optimizer's step: updates applied so far (an integer tensor snapshot,
        of the dtype of `optimizer.iterations`: int64, or int32 on JAX)."""
        return self._kc_step()

    # =========================================== what a backend may override
    def _kc_loss_and_grads(self, x, y, sample_weight, variables=None):
        """Backend: stages 1-3. Returns `(y_pred, loss, grads, variables)`: the
        gradients of the scaled loss with respect to `variables` (default: the
        trainable variables, read after the forward pass, which may build the
        model)."""
        raise NotImplementedError

    def _kc_grad_wrt(self, fn, variables=()):
        """Backend: one backward pass through `fn`, for gradients with respect to
        variables and to tensors computed inside `fn`.

        `fn(tap)` returns `(value, aux)`: a scalar and any structure of tensors
        it wants back. Inside it, `tap(t)` returns `t` (or an equal tensor) and
        marks `t` as a tensor whose gradient is wanted. On JAX only function
        arguments can be differentiated, so `fn` runs twice while tracing (once
        to find the tapped tensors' shapes, once for the backward pass) and the
        tensors in `aux` are those of the second run: use them, not tensors kept
        from inside `fn`. What `fn` assigns to variables stays assigned.

        Returns:
            `(value, aux, variable_grads, tap_grads)`: the gradients of `value`
            with respect to `variables` and to each tapped tensor, in tap order
            (zeros where `value` does not depend on one); `value` and `aux`
            are cut from any gradient computation.
        """
        raise NotImplementedError

    def _kc_vectorize(self, fn):
        """Backend: `fn` mapped over the leading axis of every argument
        (`jax.vmap`, `tf.vectorized_map`, `torch.func.vmap`). `fn` must not
        assign variables; the random numbers it draws are not independent
        per example."""
        raise NotImplementedError

    def _kc_vjp(self, fn, primals, cotangents):
        """Backend: the vector-Jacobian product of `fn` (a function of a list of
        tensors, returning tensors) at `primals`: the gradients of
        `sum(fn(primals) * cotangents)` with respect to each of `primals`.
        Works inside `_kc_vectorize`."""
        raise NotImplementedError

    def _kc_aggregate(self, grads, loss):
        """Backend: sums the gradients and the loss over replicas (once)."""
        return grads, loss

    def _kc_apply(self, optimizer, grads, variables):
        """Backend: `optimizer.apply` for gradients that are already aggregated."""
        optimizer.apply(grads, variables)

    def _kc_cond(self, pred, true_fn, false_fn, *args):
        """Backend: `ops.cond` for branches that update state; returns nothing.

        `args` are passed to the branch that runs (a backend may have to move
        them, e.g. across the replicas of a `tf.distribute` strategy).
        """
        ops.cond(pred, lambda: true_fn(*args), lambda: false_fn(*args))

    def _kc_replica_share(self):
        """Backend: the weight of one replica's log of the gradient stages (they
        see the global gradient on every replica, so each logs 1/replicas)."""
        return None

    def _kc_step(self):
        """The optimizer's step before this update (a snapshot)."""
        optimizer = getattr(self, "optimizer", None)
        if optimizer is None:
            return ops.convert_to_tensor(0, "int32")
        return ops.copy(optimizer.iterations.value)

    def _kc_snapshot(self, variables):
        """`(variable, a copy of its value)` pairs, to restore later."""
        return [(v, ops.copy(v.value)) for v in variables]

    def _kc_detach(self, value):
        """Backend: a logged value, cut from any gradient computation."""
        return value

    def _kc_build_scope(self):
        """Backend: where hook state and trackers are created (eagerly)."""
        return _keras.outside_stateless_scope()

    # ================================================ what `.keras` files see
    @property
    def __class__(self):
        # While a `.keras` file is written, Keras's serializer reads the class to
        # name from `obj.__class__`: a file names `type(self)._kc_saved_class`
        # where our class is only Keras's or the user's with our step mixed in
        # (kc.Sequential -> keras.Sequential, an attached model -> its own class),
        # so that it loads where keras_custom is not installed. At all other
        # times the real class.
        cls = type(self)
        if saving.naming_for_files():
            return cls.__dict__.get("_kc_saved_class", cls)
        return cls

    @__class__.setter
    def __class__(self, cls):
        object.__dict__["__class__"].__set__(self, cls)

    def __dir__(self):
        # `dir()` lists the attributes of `__class__` (above): Keras's saver
        # finds what to save with `dir()`, and must find the hooks' state.
        return sorted(set(super().__dir__()) | {"hooks", "_kc_accumulator"})


_TAKES_TRAINING = {}


def _takes_training(method):
    func = getattr(method, "__func__", method)
    found = _TAKES_TRAINING.get(func)
    if found is None:
        try:
            found = "training" in inspect.signature(func).parameters
        except (TypeError, ValueError):
            found = True
        _TAKES_TRAINING[func] = found
    return found


@contextlib.contextmanager
def attributes_kept_on_error(obj):
    """Leaves `obj`'s attributes as they were when the block raises (a failed
    `compile` or `attach` changes nothing)."""
    saved = dict(obj.__dict__)
    try:
        yield
    except Exception:
        for key in list(obj.__dict__):
            if key not in saved:
                object.__delattr__(obj, key)
        for key, value in saved.items():
            object.__setattr__(obj, key, value)
        raise


def _callbacks_index(fit):
    """The position of `callbacks` among `fit`'s positional parameters, or None."""
    try:
        parameters = list(inspect.signature(fit).parameters.values())
    except (TypeError, ValueError):
        return 5
    positional = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )
    for i, parameter in enumerate(parameters):
        if parameter.kind not in positional:
            return None
        if parameter.name == "callbacks":
            return i
    return None


def _with_callbacks(callbacks, first, last):
    """The user's callbacks with `first` (the hooks' own: see `Hook.callbacks`)
    before them and `last` (`_CheckHooks`) after them, each once: a
    `CallbackList` reused across `fit` calls gets them once."""

    def present(callback, where):
        if isinstance(callback, _CheckHooks):
            return any(isinstance(c, _CheckHooks) for c in where)
        return any(c is callback for c in where)

    if isinstance(callbacks, keras.callbacks.CallbackList):
        for callback in reversed(first):
            if not present(callback, callbacks.callbacks):
                _keras.insert_callback(callbacks, 0, callback)
        for callback in last:
            if not present(callback, callbacks.callbacks):
                _keras.insert_callback(callbacks, len(callbacks.callbacks), callback)
        return callbacks
    callbacks = list(callbacks or [])
    kept = [c for c in callbacks if not present(c, first) and not present(c, last)]
    return list(first) + kept + list(last)
