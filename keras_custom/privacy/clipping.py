"""The clipped sum of per-example gradients, in one backward pass where it can.

`clipped_gradient_sum(model, x, y, sample_weight, l2_norm_clip, variables)` runs
inside a train step (it uses the backend's primitives `model._kc_grad_wrt`,
`_kc_vectorize` and `_kc_vjp`) and returns, for each variable,
`sum_i c_i * grad_i` with `c_i = C / max(||grad_i||, C)`, where `grad_i` is the
gradient of example `i`'s loss with respect to all the variables together:

1. one forward pass with the leaf layers intercepted (`capture.recording`) and
   one backward pass of `sum_i loss_i` with respect to the intercepted layers'
   outputs only (no weight gradient is computed);
2. each example's squared norm: ghost norms for Dense, EinsumDense and
   Embedding, vectorized per-example gradients of a layer's own variables for
   other layers, and of the whole model for variables no layer rule can take;
3. the clip factors, then the sums: ordinary weight gradients with rescaled
   output gradients for the ghost-norm layers (no second backward pass),
   `sum_i c_i * grad_i` of the per-example gradients elsewhere.

An example's loss is the compiled loss on a batch of one (times its sample
weight): Keras's default reduction divides a weighted sum by the number of
elements, so the mean of the per-example losses is the batch loss.
"""

from typing import NamedTuple

from keras import ops
from keras import tree

from keras_custom import _keras
from keras_custom.privacy import capture

MEAN_REDUCTIONS = ("sum_over_batch_size", "mean")


class ClipResult(NamedTuple):
    """What `clipped_gradient_sum` returns.

    Attributes:
        y_pred: the predictions of the forward pass.
        sums: `sum_i c_i * grad_i` for each variable, in the order asked for.
        norms: `(B,)` float32, each example's gradient norm before clipping.
        losses: `(B,)` float32, each example's loss.
    """

    y_pred: object
    sums: list
    norms: object
    losses: object


def clip_factors(norms, l2_norm_clip):
    """`C / max(norm, C)`: 1 under the clip, finite for an all-zero gradient.

    Example:

    >>> factors = clip_factors(keras.ops.array([0.0, 0.5, 4.0]), 2.0)
    >>> keras.ops.convert_to_numpy(factors).tolist()
    [1.0, 1.0, 0.5]
    """
    clip = ops.cast(l2_norm_clip, "float32")
    return clip / ops.maximum(ops.cast(norms, "float32"), clip)


def per_example_losses(model, y, y_pred, sample_weight, owner="DifferentialPrivacy"):
    """`(B,)` float32: the compiled loss of each example, as on a batch of one.

    A single `keras.losses.Loss` with a mean reduction is evaluated once on the
    whole batch without reduction, then weighted and averaged per example with
    the broadcasting a batch of one gets; another loss runs on batches of one,
    vectorized (`model._kc_vectorize`).

    Raises:
        ValueError: the model has no compiled loss, several outputs, a masked
            output, or a loss whose reduction is not a mean over the batch.
    """
    compile_loss = _keras.compiled_loss(model)
    if compile_loss is None:
        raise ValueError(
            f"{owner}: the model must be compiled with a `loss` (the per-example "
            "losses are the compiled loss on batches of one). Received: loss=None"
        )
    if tree.is_nested(y_pred) or tree.is_nested(y):
        raise ValueError(
            f"{owner}: models with several outputs (or nested targets) are not "
            "supported yet: use a model with one output. Received: y_pred of "
            f"structure {tree.map_structure(lambda t: tuple(t.shape), y_pred)!r}"
        )
    if _keras.keras_mask(y_pred) is not None:
        raise ValueError(
            f"{owner}: the model's output carries a Keras mask, which reweights the "
            "loss by counts over the whole batch, so an example's loss would depend "
            "on the other examples. Remove the mask before the output (or compute "
            "the loss without it)."
        )
    entries = _keras.compiled_loss_entries(compile_loss, y, y_pred)
    for _, loss_fn, _ in entries:
        reduction = getattr(loss_fn, "reduction", "sum_over_batch_size")
        if reduction not in MEAN_REDUCTIONS:
            raise ValueError(
                f"{owner}: the loss must average over the batch (reduction "
                "'sum_over_batch_size', Keras's default): the private gradient is "
                "the mean of the clipped per-example gradients. Received: "
                f"reduction={reduction!r} for {loss_fn!r}"
            )
    per = _unreduced(entries, y, y_pred, sample_weight)
    if per is not None:
        return per
    return _vectorized(model, compile_loss, y, y_pred, sample_weight)


def _vectorized(model, compile_loss, y, y_pred, sample_weight):
    """The compiled loss on batches of one, vectorized."""
    if sample_weight is None:
        sample_weight = ops.ones((ops.shape(y_pred)[0],), "float32")

    def one(y_i, p_i, w_i):
        expand = ops.expand_dims
        return ops.cast(
            compile_loss(expand(y_i, 0), expand(p_i, 0), expand(w_i, 0)), "float32"
        )

    y = ops.convert_to_tensor(y)
    sample_weight = ops.convert_to_tensor(sample_weight)
    return model._kc_vectorize(one)(y, y_pred, sample_weight)


def _unreduced(entries, y, y_pred, sample_weight):
    """Per-example losses from one unreduced evaluation, or `None` if this loss
    is not one this shortcut covers (then the vectorized definition is used)."""
    if len(entries) != 1:
        return None
    path, loss_fn, loss_weight = entries[0]
    if path not in ((), [], None) or not hasattr(loss_fn, "call"):
        return None
    y_t = ops.convert_to_tensor(y, dtype=loss_fn.dtype)
    y_p = ops.convert_to_tensor(y_pred, dtype=loss_fn.dtype)
    values = loss_fn.call(y_t, y_p)
    if _keras.keras_mask(values) is not None or len(values.shape) < 1:
        return None
    if values.shape[0] is not None and y_p.shape[0] is not None:
        if values.shape[0] != y_p.shape[0]:
            return None
    values = ops.cast(values, "float32")
    if sample_weight is not None:
        weights = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
        # Line the weights up with the values as Keras would on a batch of one.
        one_values = ops.zeros((1,) + tuple(values.shape[1:]))
        one_weights = ops.zeros((1,) + tuple(weights.shape[1:]))
        one_values, one_weights = _keras.squeeze_or_expand_to_same_rank(
            one_values, one_weights
        )
        shapes = tuple(one_values.shape) + tuple(one_weights.shape)
        if None in shapes or len(one_weights.shape) > len(one_values.shape):
            return None
        batch = ops.shape(values)[0]
        values = ops.reshape(values, (batch,) + tuple(one_values.shape[1:]))
        pad = len(one_values.shape) - len(one_weights.shape)
        weights = ops.reshape(
            weights, (batch,) + (1,) * pad + tuple(one_weights.shape[1:])
        )
        values = values * weights
    axes = tuple(range(1, len(values.shape)))
    per = ops.mean(values, axis=axes) if axes else values
    if loss_weight is not None:
        per = per * loss_weight
    return per


def per_example_gradients(model, variables, x, y, sample_weight):
    """Each example's gradient of its loss with respect to `variables` (whole
    model, batch of one, vectorized): a list of `(B, *variable.shape)` tensors."""
    compile_loss = _keras.compiled_loss(model)
    trainable = list(model.trainable_variables)
    values = [ops.stop_gradient(v.value) for v in trainable]
    others = [v.value for v in model.non_trainable_variables]
    index = {id(v): k for k, v in enumerate(trainable)}
    picks = [index[id(v)] for v in variables]
    if sample_weight is None:
        first = tree.flatten(x)[0]
        sample_weight = ops.ones((ops.shape(first)[0],), "float32")

    def one(x_i, y_i, w_i):
        def loss(picked):
            full = list(values)
            for k, value in zip(picks, picked):
                full[k] = value
            batch = tree.map_structure(lambda t: ops.expand_dims(t, 0), x_i)
            y_pred, _ = model.stateless_call(full, others, batch, training=True)
            return ops.cast(
                compile_loss(ops.expand_dims(y_i, 0), y_pred, ops.expand_dims(w_i, 0)),
                "float32",
            )

        return model._kc_vjp(loss, [values[k] for k in picks], ops.ones((), "float32"))

    x = tree.map_structure(ops.convert_to_tensor, x)
    return model._kc_vectorize(one)(
        x, ops.convert_to_tensor(y), ops.convert_to_tensor(sample_weight)
    )


def clipped_gradient_sum(
    model, x, y, sample_weight, l2_norm_clip, variables, fast=True, owner=None, plan=None
):
    """`sum_i c_i * grad_i` for each of `variables`; call it inside a train step.

    Args:
        model: a built keras_custom model, compiled with a loss.
        x, y, sample_weight: the batch.
        l2_norm_clip: `C`, a float > 0.
        variables: the trainable variables to differentiate.
        fast: `False` computes every per-example gradient by the vectorized
            fallback (the plain method, for checks and benchmarks).
        owner: the name errors begin with (default `"DifferentialPrivacy"`).
        plan: a `capture.Plan` of the model made earlier (default: a new one).

    Returns:
        A `ClipResult`.

    Raises:
        ValueError: a model the computation cannot handle honestly (see
            `per_example_losses`; random layers with the global fallback).
    """
    owner = owner or "DifferentialPrivacy"
    plan = plan or capture.Plan(model, fast=fast)
    found = {}

    def forward(tap):
        with capture.recording(plan, tap) as recorder:
            y_pred = model.forward_pass(x, training=True)
        _check_no_batch_losses(model, owner)
        losses = per_example_losses(model, y, y_pred, sample_weight, owner)
        found["recorder"] = recorder
        saved = [call.saved for call in recorder.calls]
        return ops.sum(losses), (y_pred, losses, saved)

    _, (y_pred, losses, saved), _, tap_grads = model._kc_grad_wrt(forward)
    recorder = found["recorder"]
    for call, tensors in zip(recorder.calls, saved):
        call.saved = tensors  # the values the backward pass returned
    calls, left = recorder.split()
    wanted = {id(v) for v in variables}
    global_ids = (plan.global_ids | left) & wanted
    global_vars = [v for v in variables if id(v) in global_ids]
    if global_vars and plan.random_layers:
        names = [layer.name for layer in plan.random_layers]
        raise ValueError(
            f"{owner}: the variables {[v.path for v in global_vars]} need per-example "
            "gradients of the whole model (vectorized over the batch: a layer called "
            "more than once, with trainable sublayers, or without a fast rule), "
            f"and the layers {names} draw random numbers: every example would get "
            "the same draws, not its own. Remove the random layers or use layers "
            "with a fast rule (Dense, EinsumDense, Embedding) for these variables."
        )
    calls = [call for call in calls if any(id(v) in wanted for v in _own(call))]
    global_grads = []
    if global_vars:
        global_grads = per_example_gradients(model, global_vars, x, y, sample_weight)
    squares = ops.zeros_like(losses)
    for call in calls:
        squares = squares + call.rule.sq_norms(model, call, tap_grads[call.tap])
    for pg in global_grads:
        squares = squares + capture.squared_norms(pg)
    norms = ops.sqrt(ops.maximum(squares, 0.0))
    factors = clip_factors(norms, l2_norm_clip)
    sums = {}
    for call in calls:
        for vid, grad in call.rule.clipped_grads(
            model, call, tap_grads[call.tap], factors
        ).items():
            sums[vid] = grad if vid not in sums else sums[vid] + grad
    for v, pg in zip(global_vars, global_grads):
        sums[id(v)] = ops.tensordot(factors, ops.cast(pg, "float32"), axes=1)
    out = []
    for v in variables:
        grad = sums.get(id(v))
        if grad is None:  # not on the loss's path
            grad = ops.zeros(tuple(v.shape), "float32")
        out.append(ops.reshape(grad, tuple(v.shape)))
    return ClipResult(y_pred, out, norms, losses)


def _check_no_batch_losses(model, owner):
    """Refuses losses a layer added during the forward pass (`add_loss`, activity
    regularizers): they are computed from the batch, and their gradient would not
    be clipped per example. Weight regularizers are not among them."""
    regularized = sum(
        1 for v in model.trainable_weights if getattr(v, "regularizer", None) is not None
    )
    added = len(model.losses) - regularized
    if added > 0:
        raise ValueError(
            f"{owner}: layers added {added} loss term(s) computed from the batch "
            "during the forward pass (`add_loss`, activity regularizers); their "
            "gradient would not be clipped per example. Return them as part of the "
            "model's loss per example, or remove them."
        )


def _own(call):
    return _keras.own_trainable_variables(call.layer)
