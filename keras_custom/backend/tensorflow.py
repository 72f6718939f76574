"""The train and test steps on the TensorFlow backend.

Gradients come from a `tf.GradientTape`. Under a `tf.distribute` strategy
(`MirroredStrategy`, `MultiWorkerMirroredStrategy`) the step runs once per
replica, on that replica's part of the global batch. Keras's optimizer would clip
each replica's gradient and sum the replicas afterwards; here the gradients and the
loss are summed ONCE, with an explicit all-reduce, before the gradient hooks, which
therefore see the gradient of the global batch (identical on every replica). The
optimizer then applies them without summing again. A strategy refuses a
cross-replica exchange inside a `cond` branch taken in a replica, so a conditional
stage (a skipped step, an accumulation step) chooses its branch in the
cross-replica context and runs the branch in each replica from there, as Keras's
`LossScaleOptimizer` does.
"""

import contextlib

import tensorflow as tf

from keras_custom import _keras
from keras_custom.step.state import StepState
from keras_custom.step.trainer import Trainer

_keras.tf_leave_package_to_python("keras_custom")


def _replica_context():
    """The replica context of a `tf.distribute` strategy, else `None`."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    return tf.distribute.get_replica_context()


class TensorFlowTrainer(Trainer):
    """The shared step, with a gradient tape and `tf.distribute` replica sums."""

    def _kc_loss_and_grads(self, x, y, sample_weight, variables=None):
        with tf.GradientTape() as tape:
            y_pred, loss = self._kc_forward_and_loss(x, y, sample_weight, True)
            scaled = loss
            if self.optimizer is not None:
                scaled = self.optimizer.scale_loss(loss)
        if variables is None:
            # Without a strategy, Keras builds a model that is not built yet in
            # the first trace of its step: its variables exist only after this
            # forward pass (Keras's own step reads them there too).
            variables = self.trainable_variables
        grads = tape.gradient(scaled, variables) if variables else []
        return y_pred, loss, list(grads), variables

    def _kc_grad_wrt(self, fn, variables=()):
        """A tape around `fn`: it differentiates the tapped tensors directly."""
        tapped = []

        def tap(t):
            tapped.append(t)
            return t

        variables = list(variables)
        with tf.GradientTape() as tape:
            value, aux = fn(tap)
        grads = tape.gradient(
            value,
            [v.value for v in variables] + tapped,  # tf.Variables: zeros need a DType
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        grads = [tf.convert_to_tensor(g) for g in grads]  # IndexedSlices -> dense
        # (A later tape takes `value` and `aux` as constants: nothing to cut.)
        return value, aux, grads[: len(variables)], grads[len(variables) :]

    def _kc_vectorize(self, fn):
        def vectorized(*args):
            return tf.vectorized_map(lambda batch: fn(*batch), args)

        return vectorized

    def _kc_vjp(self, fn, primals, cotangents):
        primals = [tf.convert_to_tensor(p) for p in primals]
        with tf.GradientTape() as tape:
            tape.watch(primals)
            out = fn(primals)
        return tape.gradient(
            out,
            primals,
            output_gradients=cotangents,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )

    def _kc_batch_size(self, x):
        # The batch dimension may be unknown while tracing: read it at run time.
        first = next(i for i in tf.nest.flatten(x) if i is not None)
        return tf.shape(first)[0]

    def _kc_build_scope(self):
        return _build_scope(self)

    # ------------------------------------------------------- tf.distribute
    def _kc_aggregate(self, grads, loss):
        """Sums the gradients and the loss over replicas, in one all-reduce.

        Each replica's loss is already divided by the number of replicas (Keras's
        scaling for distribution, applied to hook terms too), so the sum is the
        loss of the global batch, and the gradients sum to its gradient.
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
        with _keras.tf_already_reduced(optimizer):
            return optimizer.apply(grads, variables)

    def _kc_cond(self, pred, true_fn, false_fn, *args):
        """A conditional stage that may update state and talk across replicas.

        In a replica context, every replica must take the same branch: `pred`
        holds where it holds on all replicas. The branch is chosen in the
        cross-replica context, and runs in each replica (in a thread of its own,
        with that replica's `StepState` and `args`).
        """
        context = _replica_context()
        if context is None:
            return super()._kc_cond(
                pred, _in_branch(true_fn), _in_branch(false_fn), *args
            )
        votes = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(pred, tf.float32))
        pred = tf.greater_equal(votes, float(context.num_replicas_in_sync) - 0.5)
        states = _StateHandle(StepState.current())

        def in_replica(fn):
            def run(handle, *args):
                with handle.state:
                    fn(*args)

            return run

        def merge_fn(strategy, pred, handle, *args):
            pred = strategy.experimental_local_results(pred)[0]

            def branch(fn):
                def run():
                    strategy.extended.call_for_each_replica(
                        in_replica(fn), args=(handle, *args)
                    )

                return run

            tf.cond(pred, branch(true_fn), branch(false_fn))

        context.merge_call(merge_fn, args=(pred, states, *args))

    def _kc_replica_share(self):
        context = _replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return None
        return 1.0 / context.num_replicas_in_sync


def _in_branch(fn):
    """`fn` with its tensor arguments brought into the branch's graph first.

    A branch that passes some gradients through unchanged and makes the others
    (a hook that acts on some variables only) would give the optimizer tensors
    of two graphs, the outer one and the branch's, which its all-reduce (a
    custom gradient) refuses: "All custom_gradient outputs should be from the
    same graph".
    """

    def run(*args):
        args = tf.nest.map_structure(
            lambda t: tf.identity(t) if isinstance(t, tf.Tensor) else t, args
        )
        return fn(*args)

    return run


class _StateHandle:
    """Carries a replica's `StepState` through `merge_call` (a plain object there
    would be taken for a structure of values)."""

    def __init__(self, state):
        self.state = state


@contextlib.contextmanager
def _build_scope(model):
    """Creates state eagerly (even from inside a trace) under the model's strategy."""
    with tf.init_scope():
        with model.distribute_strategy.scope():
            yield
