"""The train and test steps on the PyTorch backend.

As Keras's `TorchTrainer`: eager by default, `torch.compile` with
`jit_compile=True`. Gradients come from `torch.autograd.grad`, a fresh backward
pass per call: nothing is read from or left in the parameters' `.grad`, so
gradients cannot accumulate across steps (or across the two passes of
`SharpnessAware`) by accident. The stages after the backward pass run under
`torch.no_grad()`, as Keras runs the optimizer.

Keras variables on this backend are updated in place: a hook that keeps a value
for later must copy it (`keras.ops.copy`), as `_kc_step` does for the step.
"""

import contextlib
import warnings

import torch
from keras.src.backend.common import global_state
from keras.src.trainers.data_adapters import data_adapter_utils


@contextlib.contextmanager
def build_scope(model):
    """Creates state on the real device, outside any stateless scope.

    Hooks are built before the first step, sometimes from inside Keras's symbolic
    build, which runs on the `"meta"` device under a `StatelessScope`: their
    variables must still hold real tensors.
    """
    scope = global_state.get_global_attribute("stateless_scope")
    device = global_state.get_global_attribute("torch_device", None)
    global_state.set_global_attribute("stateless_scope", None)
    global_state.set_global_attribute("torch_device", None)
    try:
        yield
    finally:
        global_state.set_global_attribute("stateless_scope", scope)
        global_state.set_global_attribute("torch_device", device)


def _grads(loss, variables):
    """d loss / d variables by a fresh backward pass (`None` where unused)."""
    return list(
        torch.autograd.grad(loss, [v.value for v in variables], allow_unused=True)
    )


class StepMixin:
    """`train_step` and `test_step` for PyTorch: only autograd is backend code."""

    def train_step(self, data):
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
        y_pred, loss = self._kc_forward_and_loss(x, y, sample_weight, training=True)
        self._kc_track_loss(x, loss)
        scaled = loss
        if self.optimizer is not None:
            scaled = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        if variables:
            grads = _grads(scaled, variables)
            loss = loss.detach()
            with torch.no_grad():
                self._kc_update(loss, grads, variables, batch=(x, y, sample_weight))
        else:
            warnings.warn("The model does not have any trainable weights.")
        with torch.no_grad():
            return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _kc_step(self):
        # The generic `ops.copy(iterations)` goes through Keras's
        # `convert_to_tensor` in Python on every eager step; a `clone` is the same
        # snapshot (same dtype), which the in-place update of `iterations` leaves
        # alone.
        optimizer = getattr(self, "optimizer", None)
        if optimizer is None:
            return super()._kc_step()
        return optimizer.iterations.value.clone()

    def _kc_log(self, hook, name, value, reduction):
        # A logged value never needs a gradient: updating a tracker with a value
        # that requires one (a loss term) would record autograd work for nothing.
        if isinstance(value, torch.Tensor) and value.requires_grad:
            value = value.detach()
        super()._kc_log(hook, name, value, reduction)

    def _kc_gradients(self, x, y, sample_weight, variables):
        """Gradients of the loss on a batch at the variables' current values,
        unscaled, with nothing logged (for hooks that need a second pass)."""
        with self._kc_muted(), torch.enable_grad():
            y_pred, loss = self._kc_forward_and_loss(x, y, sample_weight, training=True)
            scaled = self.optimizer.scale_loss(loss)
            grads = _grads(scaled, variables)
        return self._kc_unscale(grads, record=False), loss.detach()

    def test_step(self, data):
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
        y_pred, loss = self._kc_forward_and_loss(x, y, sample_weight, training=False)
        self._kc_track_loss(x, loss)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
