"""The train and test steps on the TensorFlow backend."""

import contextlib
import warnings

import tensorflow as tf
from keras.src import tree
from keras.src.losses import loss as loss_module
from keras.src.trainers.data_adapters import data_adapter_utils


@contextlib.contextmanager
def build_scope(model):
    """Creates state eagerly (even from inside a trace) under the model's strategy."""
    with tf.init_scope():
        with model.distribute_strategy.scope():
            yield


def _batch_size(x):
    return tf.shape(next(i for i in tree.flatten(x) if i is not None))[0]


class StepMixin:
    """`train_step` and `test_step` for TensorFlow: only the tape is backend code."""

    def train_step(self, data):
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self.forward(x, training=True)
            loss = self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            self._loss_tracker.update_state(
                loss_module.unscale_loss_for_distribution(loss),
                sample_weight=_batch_size(x),
            )
            scaled = loss
            if self.optimizer is not None:
                scaled = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        if variables:
            grads = tape.gradient(scaled, variables)
            self._kc_set("_kc_batch", (x, y, sample_weight))
            try:
                self._kc_update(loss, grads, variables)
            finally:
                self._kc_set("_kc_batch", None)
        else:
            warnings.warn("The model does not have any trainable weights.")
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _kc_gradients(self, x, y, sample_weight, variables):
        """Gradients of the loss on a batch at the variables' current values,
        unscaled, with nothing logged (for hooks that need a second pass)."""
        with self._kc_muted():
            with tf.GradientTape() as tape:
                y_pred = self.forward(x, training=True)
                loss = self._compute_loss(
                    x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
                )
                scaled = self.optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, variables)
        return self._kc_unscale(grads, record=False), loss

    def test_step(self, data):
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
        y_pred = self.forward(x, training=False)
        loss = self._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False
        )
        self._loss_tracker.update_state(
            loss_module.unscale_loss_for_distribution(loss),
            sample_weight=_batch_size(x),
        )
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
