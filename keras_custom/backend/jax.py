"""The train and test steps on the JAX backend.

Keras's JAX trainer is stateless: `train_step(state, data)` receives the values of
every variable and returns the new values; `fit` jits it once. Here the whole
shared step runs inside one `keras.StatelessScope` that maps every variable (the
model's, the optimizer's, the metrics', and the hooks' state, which travels with
the metrics: `keras_custom._keras.JAXState`) to its traced value, so hook code that
reads or assigns a variable works as it does on TensorFlow; the new values are
collected when the scope closes. Three things differ from the shared code:

- the gradients: `jax.value_and_grad` of a pure function of the differentiated
  values, with a nested scope for the forward pass and the loss (`_kc_grad_wrt`
  does the same for any function, and for tensors computed inside it through
  zeros added to them, "taps", which are arguments);
- `_kc_cond` runs both branches from the same state and keeps each variable's
  value from the selected one, with `where` (an assignment inside a `lax.cond`
  branch would leak a tracer out of it);
- the step's state is checked: a variable assigned in the step that is not part of
  it would lose its new value.
"""

import contextlib
import warnings

import jax
import keras
from keras import ops

from keras_custom import _keras
from keras_custom.step.state import StepState
from keras_custom.step.trainer import Trainer


@contextlib.contextmanager
def _int64_quiet():
    """Silences JAX's "int64 truncated to int32" warning (x64 is off by default).

    Step counters are int64 on TensorFlow; JAX keeps them in int32, as Keras does
    for its own `optimizer.iterations`.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Explicitly requested dtype int64")
        yield


class JAXTrainer(Trainer, _keras.JAXState):
    """The shared step, stateless, with the hooks' state threaded through it."""

    # ------------------------------------------------------------- the state
    def _kc_extra_state(self, training):
        """What the step carries after the metrics variables: the hooks' state;
        in the test step also the optimizer's step counter, which loss terms with
        a schedule or a step window read (Keras's test state holds no optimizer
        variable)."""
        extra = self._kc.state_variables() if self._kc is not None else []
        if not training and getattr(self, "optimizer", None) is not None:
            if getattr(self.optimizer, "built", False):
                extra.append(self.optimizer.iterations)
        return extra

    def _kc_groups(self, training):
        groups = {
            "trainable": list(self.trainable_variables),
            "non_trainable": list(self.non_trainable_variables),
            "metrics": list(self.metrics_variables),
            "extra": self._kc_extra_state(training),
        }
        if training:
            groups["optimizer"] = list(self.optimizer.variables)
        return groups

    def _kc_sync_state(self):
        self._kc_sync_jax_state()

    # ------------------------------------------------------------------ steps
    def train_step(self, state, data):
        trainable, non_trainable, optimizer_values, metrics_values = state
        logs, new = self._kc_step_in_scope(
            data,
            metrics_values,
            trainable=trainable,
            non_trainable=non_trainable,
            optimizer=optimizer_values,
        )
        return logs, (
            new["trainable"],
            new["non_trainable"],
            new["optimizer"],
            new["metrics"] + new["extra"],
        )

    def test_step(self, state, data):
        trainable, non_trainable, metrics_values = state
        logs, new = self._kc_step_in_scope(
            data, metrics_values, trainable=trainable, non_trainable=non_trainable
        )
        return logs, (
            new["trainable"],
            new["non_trainable"],
            new["metrics"] + new["extra"],
        )

    def _kc_step_in_scope(self, data, metrics_values, **values):
        """Runs the shared train step (`values` has "optimizer") or test step in
        one `StatelessScope` holding `fit`'s state; returns the logs and the new
        state by group. Keras's metrics values come first in `metrics_values`,
        then those of the trackers our logs add ("extra")."""
        training = "optimizer" in values
        groups = self._kc_groups(training=training)
        n = len(groups["metrics"])
        values.update(metrics=metrics_values[:n], extra=metrics_values[n:])
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        step = self._kc_train if training else self._kc_test
        with _int64_quiet(), self._kc_scope(groups, values) as scope:
            logs = step(x, y, sample_weight, scope=scope)
        return logs, self._kc_collect(scope, self._kc_groups(training=training))

    @contextlib.contextmanager
    def _kc_scope(self, groups, values):
        mapping = []
        for key, refs in groups.items():
            mapping.extend(zip(refs, values[key]))
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            yield scope

    def _kc_collect(self, scope, groups):
        """The step's new state. A tracker made during this step (a log name seen
        for the first time) joins the metrics group: the state grows once, and
        Keras's loop passes the longer state to the next call (one more trace)."""
        known = {id(v) for refs in groups.values() for v in refs}
        stray = [k for k in scope.state_mapping if k not in known]
        if stray:
            names = [v.path for v in self._kc_all_variables() if id(v) in stray]
            raise RuntimeError(
                "JAX backend: the step assigned a variable that is not part of the "
                "model's state (trainable, non-trainable, optimizer, metric or hook "
                "variables), so its new value would be lost. Create hook state with "
                "`Hook.add_variable` in `build`. "
                f"Received: {names or 'a variable not tracked by the model'}"
            )
        return {key: [_value_in(scope, v) for v in refs] for key, refs in groups.items()}

    def _kc_all_variables(self):
        out = list(self.variables)
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None:
            out.extend(optimizer.variables)
        if self._kc is not None:
            out.extend(self._kc.state_variables())
        return out

    # -------------------------------------------------------------- stage 3
    def _kc_loss_and_grads(self, x, y, sample_weight, variables=None):
        """`jax.value_and_grad` of the forward pass and the loss, as a pure
        function of the differentiated values; what the pass assigns (moving
        statistics, metric and hook state) comes back into the step's scope."""
        outer = StepState.current().scope
        if outer is None:
            raise RuntimeError(
                "JAX backend: a step runs in a `keras.StatelessScope` holding the "
                "model's state (as `fit` and `train_on_batch` do)."
            )
        if variables is None:
            variables = self.trainable_variables
        targets = list(variables)
        target_ids = {id(v) for v in targets}

        def others():
            seen = set(target_ids)
            out = []
            for v in self._kc_all_variables() + list(self.metrics_variables):
                if id(v) not in seen:
                    seen.add(id(v))
                    out.append(v)
            return out

        refs = others()
        current = [_value_in(outer, v) for v in refs]
        touched = []  # the variables the pass may have assigned (set while tracing)

        def loss_fn(target_values):
            mapping = list(zip(refs, current)) + list(zip(targets, target_values))
            with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as s:
                y_pred, loss = self._kc_forward_and_loss(x, y, sample_weight, True)
                scaled = loss
                if self.optimizer is not None:
                    scaled = self.optimizer.scale_loss(loss)
            # A tracker made in this pass (a new log name) is among them now.
            touched[:] = [v for v in others() if id(v) in s.state_mapping]
            return scaled, (loss, y_pred, [s.get_current_value(v) for v in touched])

        start = [_value_in(outer, v) for v in targets]
        if targets:
            (_, (loss, y_pred, updates)), grads = jax.value_and_grad(
                loss_fn, has_aux=True
            )(start)
        else:
            _, (loss, y_pred, updates) = loss_fn(start)
            grads = []
        for variable, value in zip(touched, updates):
            variable.assign(value)
        return y_pred, loss, list(grads), targets

    def _kc_grad_wrt(self, fn, variables=()):
        """`jax.vjp` of a pure function of the variables' values and of "taps":
        zeros added to the tensors `fn` taps, whose shapes a first, abstract run
        (`jax.eval_shape`, while tracing only) finds. As in `_kc_loss_and_grads`,
        `fn` runs in a nested scope and what it assigns comes back."""
        outer = StepState.current().scope if StepState.current() else None
        if outer is None:
            raise RuntimeError(
                "JAX backend: gradients are taken in a step's `keras.StatelessScope` "
                "(as `fit` and `train_on_batch` run it)."
            )
        targets = list(variables)
        target_ids = {id(v) for v in targets}
        refs = [
            v
            for v in _unique(self._kc_all_variables() + list(self.metrics_variables))
            if id(v) not in target_ids
        ]
        current = [_value_in(outer, v) for v in refs]
        touched = []

        def pure(target_values, tap):
            mapping = list(zip(refs, current)) + list(zip(targets, target_values))
            with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as s:
                value, aux = fn(tap)
            touched[:] = [v for v in refs if id(v) in s.state_mapping]
            return value, (aux, [s.get_current_value(v) for v in touched])

        shapes = []

        def record(t):
            shapes.append(jax.ShapeDtypeStruct(t.shape, t.dtype))
            return t

        start = [_value_in(outer, v) for v in targets]
        jax.eval_shape(lambda values: pure(values, record)[0], start)

        def with_taps(target_values, taps):
            position = iter(range(len(taps)))
            return pure(target_values, lambda t: t + taps[next(position)])

        taps = [jax.numpy.zeros(s.shape, s.dtype) for s in shapes]
        value, vjp_fn, (aux, updates) = jax.vjp(with_taps, start, taps, has_aux=True)
        variable_grads, tap_grads = vjp_fn(jax.numpy.ones_like(value))
        for variable, new in zip(touched, updates):
            variable.assign(new)
        return value, aux, list(variable_grads), list(tap_grads)

    def _kc_vectorize(self, fn):
        return jax.vmap(fn)

    def _kc_vjp(self, fn, primals, cotangents):
        _, vjp_fn = jax.vjp(fn, list(primals))
        return list(vjp_fn(cotangents)[0])

    def _kc_snapshot(self, variables):
        # Values in a stateless scope are immutable arrays: no copy needed.
        return [(v, v.value) for v in variables]

    def _kc_new_tracker_in_step(self, name):
        if keras.distribution.distribution() is not None:
            raise RuntimeError(
                f"JAX backend: the log name {name!r} first appeared inside a step "
                "under `keras.distribution`, whose state layout is fixed before the "
                f"first step. Declare it in the hook: `self.declare_log({name!r})` "
                f"in `__init__` or `build` (or `model.log_value({name!r}, None)`)."
            )
        super()._kc_new_tracker_in_step(name)

    def _kc_build_scope(self):
        return _build_scope()

    # -------------------------------------------------------- conditions
    def _kc_cond(self, pred, true_fn, false_fn, *args):
        """`cond` for branches that update state, without `lax.cond`.

        Both branches run, each from the same state, and every variable keeps the
        value of the branch `pred` selects (`where`). With a concrete `pred`
        (eagerly, outside `jit`) only the selected branch runs.
        """
        pred = ops.convert_to_tensor(pred)
        if not isinstance(pred, jax.core.Tracer):
            return true_fn(*args) if bool(pred) else false_fn(*args)
        scope = _keras.current_stateless_scope()
        if scope is None:
            raise RuntimeError(
                "JAX backend: a traced step must run in a `keras.StatelessScope` "
                "holding the model's state (as `fit` and `train_on_batch` do); "
                "call `apply_hooks` eagerly or from such a scope. "
                f"Received: a traced condition {pred!r} outside any scope"
            )
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
        return None


def _unique(variables):
    seen = set()
    out = []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def _value_in(scope, variable):
    value = scope.get_current_value(variable)
    return variable.value if value is None else value


@contextlib.contextmanager
def _build_scope():
    """Creates state with concrete values, outside any stateless scope (hooks may be
    built from inside Keras's symbolic build)."""
    with _keras.outside_stateless_scope(), jax.ensure_compile_time_eval(), _int64_quiet():
        yield
