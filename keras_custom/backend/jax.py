"""The train and test steps on the JAX backend.

Keras's JAX trainer is stateless: `train_step(state, data)` receives the values of
every variable as `(trainable, non_trainable, optimizer, metrics)` and returns the
new values; `fit` jits it once. Hooks add state of their own (strength variables,
counters, seeds). Here that state travels as an extra group appended to the
metrics group, so Keras's `fit`/`evaluate` loops, which unpack four (three) groups,
run unchanged; `_get_jax_state`, `jax_state_sync` and the sharding spec know the
longer group. The log trackers are Keras metrics in `model.metrics`, so they are in
the metrics group already.

Inside the step the generic stages (`keras_custom/trainer.py`) run in a
`keras.StatelessScope` that maps every variable to its traced value: hook code that
reads or assigns a variable works as it does on TensorFlow, and the new values are
collected when the scope closes. The model's own state holders (the gradient
accumulator) travel with the hooks' state. Three things differ from the generic
code:

- `apply_update` selects old or new values with `where` instead of running the
  optimizer in a `cond` branch (an assignment inside a `lax.cond` branch would leak
  a tracer out of the branch);
- `_kc_cond` (the gradient-accumulation update) runs both branches from the same
  state and keeps each variable's value from the selected one, with `where`;
- a log name must be declared in `build` (`Hook.declare_log`): the jitted step
  cannot create the variables of a new tracker.
"""

import contextlib
import warnings

import jax
import keras
from keras import ops
from keras.src.backend.common import global_state
from keras.src.backend.common.stateless_scope import get_stateless_scope
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras.src.trainers.data_adapters import data_adapter_utils

_LSO = keras.optimizers.LossScaleOptimizer


@contextlib.contextmanager
def build_scope(model):
    """Creates state with concrete values, outside any stateless scope.

    Hooks are built before the first step, sometimes from inside Keras's symbolic
    build (a `jax.eval_shape` trace under a `StatelessScope`): their variables must
    still hold real arrays, not tracers or deferred initializers.
    """
    scope = global_state.get_global_attribute("stateless_scope")
    global_state.set_global_attribute("stateless_scope", None)
    try:
        with jax.ensure_compile_time_eval(), _int64_quiet():
            yield
    finally:
        global_state.set_global_attribute("stateless_scope", scope)


@contextlib.contextmanager
def _int64_quiet():
    """Silences JAX's "int64 truncated to int32" warning (x64 is off by default).

    Step counters are int64 on TensorFlow; JAX keeps them in int32, as Keras does
    for its own `optimizer.iterations`.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Explicitly requested dtype int64")
        yield


def _any(conditions):
    result = None
    for condition in conditions or ():
        result = condition if result is None else ops.logical_or(result, condition)
    return result


def _current(variable):
    """The value of `variable` in the current stateless scope (no autocast)."""
    scope = get_stateless_scope()
    if scope is not None:
        value = scope.get_current_value(variable)
        if value is not None:
            return value
    return variable.value


def _hook_variables(hooks):
    """Every hook's state variables, in hook order, each once."""
    seen = set()
    out = []
    for hook in hooks:
        for variable in hook.variables:
            if id(variable) not in seen:
                seen.add(id(variable))
                out.append(variable)
    return out


class StepMixin:
    """`train_step`/`test_step` for JAX: stateless, with the hooks' state threaded."""

    _kc_test_spec = False

    # ------------------------------------------------------------- the state
    def _kc_extra_variables(self, training):
        """What the step carries after the metrics variables.

        The hooks' variables; in the test step also the optimizer's step counter,
        which loss terms with a schedule or a step window read (the test state of
        Keras holds no optimizer variable).
        """
        extra = _hook_variables(self._kc_all_hooks)
        if not training and getattr(self, "optimizer", None) is not None:
            if getattr(self.optimizer, "built", False):
                extra.append(self.optimizer.iterations)
        return extra

    def _kc_groups(self, training):
        groups = {
            "trainable": list(self.trainable_variables),
            "non_trainable": list(self.non_trainable_variables),
            "metrics": list(self.metrics_variables),
            "extra": self._kc_extra_variables(training),
        }
        if training:
            groups["optimizer"] = list(self.optimizer.variables)
        return groups

    def _get_jax_state(
        self,
        trainable_variables=False,
        non_trainable_variables=False,
        optimizer_variables=False,
        metrics_variables=False,
        purge_model_variables=False,
    ):
        state = super()._get_jax_state(
            trainable_variables=trainable_variables,
            non_trainable_variables=non_trainable_variables,
            optimizer_variables=optimizer_variables,
            metrics_variables=metrics_variables,
            purge_model_variables=purge_model_variables,
        )
        if not metrics_variables:
            return state
        extra = self._kc_extra_variables(training=optimizer_variables)
        state = list(state)
        state[-1] = list(state[-1]) + [v.value for v in extra]
        return tuple(state)

    def jax_state_sync(self):
        jax_state = getattr(self, "_jax_state", None)
        if not jax_state or self._jax_state_synced:
            return
        values = jax_state.get("metrics_variables", None)
        if values:
            n = len(self.metrics_variables)
            training = jax_state.get("optimizer_variables", None) is not None
            extra = self._kc_extra_variables(training)
            for variable, value in zip(extra, values[n:]):
                variable.assign(value)
            self._jax_state = dict(jax_state, metrics_variables=list(values[:n]))
        super().jax_state_sync()

    def _get_state_sharding_spec(self):
        trainable, non_trainable, optimizer, metrics = super()._get_state_sharding_spec()
        extra = self._kc_extra_variables(training=not self._kc_test_spec)
        metrics = list(metrics) + [v.value.sharding for v in extra]
        return trainable, non_trainable, optimizer, metrics

    def make_test_function(self, force=False):
        self._kc_set("_kc_test_spec", True)
        try:
            return super().make_test_function(force=force)
        finally:
            self._kc_set("_kc_test_spec", False)

    # --------------------------------------------------------------- helpers
    def _kc_mapping(self, groups, values):
        mapping = []
        for key, refs in groups.items():
            mapping.extend(zip(refs, values[key]))
        return mapping

    def _kc_collect(self, scope, groups, keys):
        return {key: [scope.get_current_value(v) for v in groups[key]] for key in keys}

    def _kc_check_assigned(self, scope, groups):
        known = {id(v) for refs in groups.values() for v in refs}
        if all(key in known for key in scope.state_mapping):
            return
        names = []
        for variable in _all_variables_of(self):
            if id(variable) in scope.state_mapping and id(variable) not in known:
                names.append(variable.path)
        raise RuntimeError(
            "JAX backend: the step assigned a variable that is not part of the "
            "model's state (trainable, non-trainable, optimizer, metric or hook "
            "variables), so its new value would be lost. Create hook state with "
            "`Hook.add_variable` in `build`. "
            f"Received: {names or 'a variable not tracked by the model'}"
        )

    def _kc_log(self, hook, name, value, reduction):
        trackers = self._kc_trackers or {}
        if name not in trackers and in_stateless_scope():
            raise RuntimeError(
                f"{type(hook).__name__}: the log name {name!r} was not declared. "
                "On the JAX backend the compiled step cannot create a tracker: call "
                f"`self.declare_log({name!r})` in the hook's `build`. "
                f"Received: name={name!r}"
            )
        super()._kc_log(hook, name, value, reduction)

    # ------------------------------------------------------------------ steps
    def train_step(self, state, data):
        with _int64_quiet():
            return self._kc_train_step(state, data)

    def test_step(self, state, data):
        with _int64_quiet():
            return self._kc_test_step(state, data)

    def _kc_train_step(self, state, data):
        trainable, non_trainable, optimizer_values, metrics_values = state
        groups = self._kc_groups(training=True)
        n = len(groups["metrics"])
        values = {
            "trainable": list(trainable),
            "non_trainable": list(non_trainable),
            "optimizer": list(optimizer_values),
            "metrics": list(metrics_values[:n]),
            "extra": list(metrics_values[n:]),
        }
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)

        def loss_fn(trainable_values):
            mapping = self._kc_mapping(groups, dict(values, trainable=trainable_values))
            with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as s:
                y_pred, loss = self._kc_forward_and_loss(
                    x, y, sample_weight, training=True
                )
                scaled = loss
                if self.optimizer is not None:
                    scaled = self.optimizer.scale_loss(loss)
            self._kc_check_assigned(s, groups)
            new = self._kc_collect(s, groups, ("non_trainable", "metrics", "extra"))
            return scaled, (loss, y_pred, new)

        if groups["trainable"]:
            (_, (loss, y_pred, new)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                values["trainable"]
            )
        else:
            warnings.warn("The model does not have any trainable weights.")
            _, (loss, y_pred, new) = loss_fn(values["trainable"])
            grads = None
        values.update(new)

        mapping = self._kc_mapping(groups, values)
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self._kc_track_loss(x, loss)
            if grads is not None:
                self._kc_update(
                    loss, list(grads), groups["trainable"], batch=(x, y, sample_weight)
                )
            logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        self._kc_check_assigned(scope, groups)
        new = self._kc_collect(scope, groups, groups.keys())
        state = (
            new["trainable"],
            new["non_trainable"],
            new["optimizer"],
            new["metrics"] + new["extra"],
        )
        return logs, state

    def _kc_test_step(self, state, data):
        trainable, non_trainable, metrics_values = state
        groups = self._kc_groups(training=False)
        n = len(groups["metrics"])
        values = {
            "trainable": list(trainable),
            "non_trainable": list(non_trainable),
            "metrics": list(metrics_values[:n]),
            "extra": list(metrics_values[n:]),
        }
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
        mapping = self._kc_mapping(groups, values)
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            y_pred, loss = self._kc_forward_and_loss(x, y, sample_weight, training=False)
            self._kc_track_loss(x, loss)
            logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        self._kc_check_assigned(scope, groups)
        new = self._kc_collect(scope, groups, groups.keys())
        return logs, (
            new["trainable"],
            new["non_trainable"],
            new["metrics"] + new["extra"],
        )

    def _kc_gradients(self, x, y, sample_weight, variables):
        """Gradients of the loss on a batch at the variables' current values,
        unscaled, with nothing logged (for hooks that need a second pass)."""
        groups = self._kc_groups(training=True)
        refs = [v for key in groups for v in groups[key]]
        current = [_current(v) for v in refs]
        targets = list(variables)
        positions = {id(v): i for i, v in enumerate(refs)}

        def loss_fn(target_values):
            values = list(current)
            for variable, value in zip(targets, target_values):
                values[positions[id(variable)]] = value
            with self._kc_muted():
                with keras.StatelessScope(
                    state_mapping=list(zip(refs, values)), collect_losses=True
                ):
                    y_pred, loss = self._kc_forward_and_loss(
                        x, y, sample_weight, training=True
                    )
                    scaled = self.optimizer.scale_loss(loss)
            return scaled, loss

        grads, loss = jax.grad(loss_fn, has_aux=True)([_current(v) for v in targets])
        return self._kc_unscale(grads, record=False), loss

    # -------------------------------------------------------- update stage
    def _kc_cond(self, pred, true_fn, false_fn, *args):
        """`cond` for branches that update state, without `lax.cond`.

        An assignment inside a `lax.cond` branch would leak a tracer out of the
        branch. Here both branches run, each from the same state, and every
        variable keeps the value of the branch `pred` selects (`where`). With a
        concrete `pred` (eager, outside `jit`) only the selected branch runs.
        """
        pred = ops.convert_to_tensor(pred)
        if not isinstance(pred, jax.core.Tracer):
            return true_fn(*args) if bool(pred) else false_fn(*args)
        scope = get_stateless_scope()
        if scope is None:
            raise RuntimeError(
                "JAX backend: a traced step must run in a `keras.StatelessScope` "
                "holding the model's state (as `fit` and `train_on_batch` do); "
                "call `apply_hooks` eagerly or from such a scope. "
                f"Received: a traced condition {pred!r} outside any scope"
            )
        self._kc_where_branches(scope, pred, true_fn, false_fn, args)
        return None

    def _kc_where_branches(self, scope, pred, true_fn, false_fn, args):
        before = dict(scope.state_mapping)
        true_fn(*args)
        after_true = dict(scope.state_mapping)
        scope.state_mapping.clear()
        scope.state_mapping.update(before)
        false_fn(*args)
        after_false = dict(scope.state_mapping)
        for key in set(after_true) | set(after_false):
            on_true = after_true.get(key, before.get(key))
            on_false = after_false.get(key, before.get(key))
            if on_true is on_false:
                continue
            if on_true is None or on_false is None:
                raise RuntimeError(
                    "JAX backend: a conditional stage assigned a variable that is "
                    "not part of the step's state (create hook state with "
                    "`Hook.add_variable` in `build`)."
                )
            scope.state_mapping[key] = ops.where(pred, on_true, on_false)

    def apply_update(self, grads, variables, step):
        """Stage 5 without `cond`: the update is computed, then kept or dropped.

        Same contract as the generic stage: a skipped step leaves weights,
        optimizer slots and the step counter bit-identical; under loss scaling a
        non-finite gradient lowers the scale.
        """
        optimizer = self.optimizer
        skip = _any(self._kc_skips)
        lso = isinstance(optimizer, _LSO)
        inner = optimizer.inner_optimizer if lso else optimizer
        finite = self._kc_lso_finite if lso else None
        go = None
        if finite is not None:
            go = finite
            if skip is not None:
                go = ops.logical_and(finite, ops.logical_not(skip))
        elif skip is not None:
            go = ops.logical_not(skip)
        if go is None:
            inner.apply(grads, variables)
            return
        tracked = list(variables) + list(inner.variables)
        old = [_current(v) for v in tracked]
        inner.apply(grads, variables)
        for variable, before in zip(tracked, old):
            variable.assign(ops.where(go, _current(variable), before))
        if finite is not None:
            _lso_update(optimizer, finite, go)


def _lso_update(optimizer, finite, go):
    """The loss-scale bookkeeping of `LossScaleOptimizer`, branch-free.

    Applied: count the step, doubling the scale every `dynamic_growth_steps`.
    Non-finite gradients: halve the scale, reset the count. Skipped by a hook with
    finite gradients: unchanged.
    """
    counter = _current(optimizer.step_counter)
    scale = _current(optimizer.dynamic_scale)
    grow = ops.equal(counter, optimizer.dynamic_growth_steps - 1)
    zero = ops.zeros_like(counter)
    applied_counter = ops.where(grow, zero, counter + 1)
    applied_scale = ops.where(grow, scale * 2.0, scale)
    optimizer.step_counter.assign(
        ops.where(go, applied_counter, ops.where(finite, counter, zero))
    )
    optimizer.dynamic_scale.assign(
        ops.where(go, applied_scale, ops.where(finite, scale, scale * 0.5))
    )


def _all_variables_of(model):
    out = list(model.variables)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        out.extend(optimizer.variables)
    out.extend(_hook_variables(model._kc_all_hooks))
    return out
