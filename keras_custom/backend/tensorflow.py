"""The train and test steps on the TensorFlow backend.

Under a `tf.distribute` strategy (`MirroredStrategy`,
`MultiWorkerMirroredStrategy`) the step runs once per replica, on that replica's
part of the global batch. Keras's optimizer would clip each replica's gradient and
sum the replicas afterwards; here the gradients and the loss are summed ONCE, with
an explicit all-reduce, before the gradient hooks, which therefore see the gradient
of the global batch (identical on every replica). The optimizer then applies them
without summing again (`_already_reduced`). A strategy refuses a cross-replica
exchange inside a `cond` branch taken in a replica, so a conditional stage (a
skipped step, a loss-scale step, an accumulation step) chooses its branch in the
cross-replica context and runs the branch in each replica from there, as Keras's
`LossScaleOptimizer` does.
"""

import contextlib
import functools
import warnings

import tensorflow as tf
from keras.src import tree
from keras.src.trainers.data_adapters import data_adapter_utils
from tensorflow.python.autograph.core import config as _autograph_config

# Our step code is plain Python over tensors, like Keras's own (which AutoGraph
# leaves alone): a user's `tf.function` that calls `model.compute_loss` or
# `model.apply_hooks` must not have AutoGraph rewrite it (it cannot, and says so).
if not any(
    getattr(rule, "_prefix", None) == "keras_custom"
    for rule in _autograph_config.CONVERSION_RULES
):
    _autograph_config.CONVERSION_RULES = (
        _autograph_config.DoNotConvert("keras_custom"),
        *_autograph_config.CONVERSION_RULES,
    )


@contextlib.contextmanager
def build_scope(model):
    """Creates state eagerly (even from inside a trace) under the model's strategy."""
    with tf.init_scope():
        with model.distribute_strategy.scope():
            yield


def _replica_context():
    """The replica context of a `tf.distribute` strategy, else `None`."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    return tf.distribute.get_replica_context()


def _tf_optimizers(optimizer):
    """The optimizer and those it wraps (`LossScaleOptimizer`, `MultiOptimizer`)."""
    out = [optimizer]
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:
        out += _tf_optimizers(inner)
    for sub in getattr(optimizer, "optimizers", None) or ():
        out += _tf_optimizers(sub)
    return out


def _skip_when_reduced(optimizer, original, grads_and_vars):
    if optimizer.__dict__.get("_kc_reduced", 0) > 0:
        return list(grads_and_vars)
    return original(grads_and_vars)


@contextlib.contextmanager
def _already_reduced(optimizer):
    """Inside, the optimizer applies gradients without summing them over replicas.

    Keras's `TFOptimizer` all-reduces in `_all_reduce_sum_gradients`; the model
    has done it already. A count (not a flag) per optimizer, because the
    replicas' threads enter and leave this scope in turns.
    """
    optimizers = _tf_optimizers(optimizer)
    for opt in optimizers:
        if "_kc_reduced" not in opt.__dict__:
            original = opt._all_reduce_sum_gradients
            object.__setattr__(opt, "_kc_reduced", 0)
            object.__setattr__(
                opt,
                "_all_reduce_sum_gradients",
                functools.partial(_skip_when_reduced, opt, original),
            )
        object.__setattr__(opt, "_kc_reduced", opt._kc_reduced + 1)
    try:
        yield
    finally:
        for opt in optimizers:
            object.__setattr__(opt, "_kc_reduced", opt._kc_reduced - 1)


class StepMixin:
    """`train_step` and `test_step` for TensorFlow: only the tape is backend code."""

    def _kc_batch_size(self, x):
        # The batch dimension may be unknown while tracing: read it at run time.
        return tf.shape(next(i for i in tree.flatten(x) if i is not None))[0]

    def train_step(self, data):
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred, loss = self._kc_forward_and_loss(x, y, sample_weight, training=True)
            self._kc_track_loss(x, loss)
            scaled = loss
            if self.optimizer is not None:
                scaled = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        if variables:
            grads = tape.gradient(scaled, variables)
            self._kc_update(loss, grads, variables, batch=(x, y, sample_weight))
        else:
            warnings.warn("The model does not have any trainable weights.")
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _kc_gradients(self, x, y, sample_weight, variables):
        """Gradients of the loss on a batch at the variables' current values,
        unscaled, with nothing logged (for hooks that need a second pass)."""
        with self._kc_muted():
            with tf.GradientTape() as tape:
                y_pred, loss = self._kc_forward_and_loss(
                    x, y, sample_weight, training=True
                )
                scaled = self.optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, variables)
        grads, loss = self._kc_aggregate(list(grads), loss)
        return self._kc_unscale(grads, record=False), loss

    # ------------------------------------------------------- tf.distribute
    def _kc_aggregate(self, grads, loss):
        """Sums the gradients and the loss over replicas, in one all-reduce.

        Each replica's loss is already divided by the number of replicas (Keras's
        `scale_loss_for_distribution`, applied to hook terms too), so the sum is
        the loss of the global batch, and the gradients sum to its gradient.
        """
        context = _replica_context()
        if context is None:
            return grads, loss
        values = [g for g in grads if g is not None]
        if loss is not None:
            values.append(loss)
        if not values:
            return grads, loss
        reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, values)
        if loss is not None:
            loss = reduced.pop()
        reduced = iter(reduced)
        return [None if g is None else next(reduced) for g in grads], loss

    def _kc_apply(self, optimizer, grads, variables):
        if _replica_context() is None:
            return optimizer.apply(grads, variables)
        with _already_reduced(optimizer):
            return optimizer.apply(grads, variables)

    def _kc_cond(self, pred, true_fn, false_fn, *args):
        """A conditional stage that may update state and talk across replicas.

        In a replica context, every replica must take the same branch: `pred`
        holds where it holds on all replicas. The branch is chosen in the
        cross-replica context, and runs in each replica with its own `args`.
        """
        context = _replica_context()
        if context is None:
            return super()._kc_cond(pred, true_fn, false_fn, *args)
        votes = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(pred, tf.float32))
        pred = tf.greater_equal(votes, float(context.num_replicas_in_sync) - 0.5)
        model = self

        def in_replica(fn):
            def run(batch, *args):
                with model._kc_batch_scope(batch):
                    fn(*args)

            return run

        def merge_fn(strategy, pred, batch, *args):
            pred = strategy.experimental_local_results(pred)[0]

            def branch(fn):
                def run():
                    strategy.extended.call_for_each_replica(
                        in_replica(fn), args=(batch, *args)
                    )

                return run

            tf.cond(pred, branch(true_fn), branch(false_fn))

        context.merge_call(merge_fn, args=(pred, self._kc_batch, *args))

    def _kc_log(self, hook, name, value, reduction):
        """Logs of the gradient stages count once, not once per replica.

        The gradient stages see the global gradient on every replica, and a
        tracker sums its replicas when read: each replica's log weighs 1/replicas.
        Loss terms log per-replica values, which the trackers combine as they are.
        """
        context = _replica_context()
        if (
            context is None
            or value is None
            or self._kc_skips is None
            or context.num_replicas_in_sync == 1
        ):
            return super()._kc_log(hook, name, value, reduction)
        previous = self._kc_window
        share = 1.0 / context.num_replicas_in_sync
        self._kc_set("_kc_window", share if previous is None else previous * share)
        try:
            return super()._kc_log(hook, name, value, reduction)
        finally:
            self._kc_set("_kc_window", previous)

    def test_step(self, data):
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
        y_pred, loss = self._kc_forward_and_loss(x, y, sample_weight, training=False)
        self._kc_track_loss(x, loss)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
