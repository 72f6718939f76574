"""The train and test steps on the PyTorch backend.

As Keras's `TorchTrainer`: eager by default, `torch.compile` with
`jit_compile=True`. Gradients come from `torch.autograd.grad`, a fresh backward
pass per call: nothing is read from or left in the parameters' `.grad`, so
gradients cannot accumulate across steps (or across the two passes of
`SharpnessAware`) by accident. The stages after the backward pass run under
`torch.no_grad()`, as Keras runs the optimizer.

Keras variables on this backend are updated in place: a value kept for later must
be copied (`_kc_step`, `_kc_snapshot` do).
"""

import torch
from keras import tree

from keras_custom import _keras
from keras_custom.step.trainer import Trainer


class TorchTrainer(Trainer):
    """The shared step, with autograd for the gradients."""

    def _kc_loss_and_grads(self, x, y, sample_weight, variables=None):
        with torch.enable_grad():
            y_pred, loss = self._kc_forward_and_loss(x, y, sample_weight, True)
            scaled = loss
            if self.optimizer is not None:
                scaled = self.optimizer.scale_loss(loss)
            if variables is None:
                variables = self.trainable_variables
            grads = []
            if variables:
                grads = list(
                    torch.autograd.grad(
                        scaled, [v.value for v in variables], allow_unused=True
                    )
                )
        return y_pred, loss.detach(), grads, variables

    def _kc_grad_wrt(self, fn, variables=()):
        """`torch.autograd.grad` with respect to the variables and the tapped
        tensors only: autograd computes no other gradient."""
        tapped = []

        def tap(t):
            tapped.append(t)
            return t

        with torch.enable_grad():
            value, aux = fn(tap)
            inputs = [v.value for v in variables] + tapped
            wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
            found = []
            if wanted and value.requires_grad:
                found = torch.autograd.grad(
                    value, [inputs[i] for i in wanted], allow_unused=True
                )
        grads = [None] * len(inputs)
        for i, g in zip(wanted, found):
            grads[i] = g
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
        value, aux = tree.map_structure(_detached, (value, aux))
        n = len(variables)
        return value, aux, grads[:n], grads[n:]

    def _kc_vectorize(self, fn):
        mapped = torch.func.vmap(fn)

        def vectorized(*args):
            with _keras.torch_vmap_safe():
                return mapped(*args)

        return vectorized

    def _kc_vjp(self, fn, primals, cotangents):
        with torch.enable_grad():
            _, vjp_fn = torch.func.vjp(fn, list(primals))
            return list(vjp_fn(cotangents)[0])

    def _kc_update(self, state, loss, grads, variables):
        with torch.no_grad():
            return super()._kc_update(state, loss, grads, variables)

    def _kc_metrics(self, x, y, y_pred, sample_weight):
        with torch.no_grad():
            return super()._kc_metrics(x, y, y_pred, sample_weight)

    def _kc_step(self):
        # The generic `ops.copy(iterations)` goes through Keras's
        # `convert_to_tensor` in Python on every eager step; a `clone` is the same
        # snapshot (same dtype), which the in-place update of `iterations` leaves
        # alone.
        optimizer = getattr(self, "optimizer", None)
        if optimizer is None:
            return super()._kc_step()
        return optimizer.iterations.value.clone()

    def _kc_snapshot(self, variables):
        return [(v, v.value.clone()) for v in variables]

    def _kc_detach(self, value):
        # A logged value never needs a gradient: updating a tracker with a value
        # that requires one (a loss term) would record autograd work for nothing.
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return value.detach()
        return value


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else value
