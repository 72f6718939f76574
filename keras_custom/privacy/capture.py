"""Which rule computes each layer's per-example gradient norms, and a recorder of
one forward pass that keeps what the rules need, without changing the model.

`Plan(model)` walks the model's layers once per traced step. Every *leaf* layer
(trainable variables of its own and no trainable sublayer) is intercepted during
the forward pass (`recording(plan, tap)`): it runs with an instance attribute
`call` that shadows its class's (`_keras.calls_replaced`), keeps its input, and
passes one output tensor through `tap` so that the backward pass returns that
tensor's gradient. The attributes are removed when the pass ends: no class
changes, nothing is stored in the model.

Rules, by layer:

* `DenseRule`, `EinsumDenseRule`, `EmbeddingRule`: ghost norms and book-keeping
  sums (`keras_custom.privacy.ghost`) from the layer's input and the gradient of
  its pre-activation output. Dense and EinsumDense recompute their linear part
  with Keras's own ops, tap it, then apply the activation.
* `LocalFallbackRule` (any other leaf layer, e.g. `Conv2D`,
  `LayerNormalization`): per-example gradients of the layer's own variables only,
  vectorized over the batch, from its recorded input and output gradient.
* Everything else (variables of a layer called twice, of a layer with trainable
  sublayers, shared between layers, or of a leaf layer no rule can take) goes to
  the "global fallback": per-example gradients of the whole model with respect
  to those variables, vectorized over the batch (`clipping.per_example_gradients`).

A plan with `fast=False` sends every variable to the global fallback: the plain
vectorized computation, for cross-checks and benchmarks.
"""

import contextlib
import dataclasses

import keras
from keras import ops
from keras import tree

from keras_custom import _keras
from keras_custom.privacy import ghost


@dataclasses.dataclass
class Call:
    """One intercepted call of a leaf layer during the recorded forward pass.

    Attributes:
        layer: the layer.
        rule: the `Rule` that handles it.
        saved: the tensors the rule needs later (the layer's input).
        options: Python values the rule needs (the call's keyword arguments).
        tap: the position of its tapped tensor among the pass's taps.
    """

    layer: object
    rule: "Rule"
    saved: object
    options: dict
    tap: int
    cache: dict = dataclasses.field(default_factory=dict)


class Rule:
    """How one kind of layer gives per-example squared norms and clipped sums.

    `forward` replaces the layer's `call` while the pass is recorded and returns
    `(outputs, saved, options)`, or `None` when the rule cannot take this call
    (its variables then go to the global fallback). `sq_norms` and
    `clipped_grads` receive `g`, the gradient of `sum_i loss_i` with respect to
    the tapped tensor.
    """

    name = "rule"

    def applies(self, layer):
        raise NotImplementedError

    def forward(self, layer, original_call, tap, args, kwargs):
        raise NotImplementedError

    def sq_norms(self, model, call, g):
        """`(B,)` float32: each example's squared gradient norm for this layer."""
        raise NotImplementedError

    def clipped_grads(self, model, call, g, c):
        """`{id(variable): sum_i c_i * grad_i}` for the layer's variables."""
        raise NotImplementedError


def _one_input(args, kwargs):
    return len(args) == 1 and set(kwargs) <= {"training"}


def _linear_variables(layer):
    """Whether the layer's own trainable variables are exactly kernel (+ bias)."""
    expected = {id(layer.kernel)}
    if layer.bias is not None:
        expected.add(id(layer.bias))
    return {id(v) for v in _keras.own_trainable_variables(layer)} == expected


class DenseRule(Rule):
    name = "dense"

    def applies(self, layer):
        return _keras.runs_its_own_call(layer, keras.layers.Dense) and _linear_variables(
            layer
        )

    def forward(self, layer, original_call, tap, args, kwargs):
        if not _one_input(args, kwargs):
            return None
        (inputs,) = args
        # keras.layers.Dense.call, with the tap before the activation.
        z = ops.matmul(inputs, layer.kernel)
        return _biased_activation(layer, z, tap), inputs, {}

    def sq_norms(self, model, call, g):
        return ghost.dense_sq_norms(call.saved, g, use_bias=call.layer.bias is not None)

    def clipped_grads(self, model, call, g, c):
        layer = call.layer
        kernel, bias = ghost.dense_clipped_grads(
            call.saved, g, c, use_bias=layer.bias is not None
        )
        return _kernel_and_bias(layer, kernel, bias)


def _biased_activation(layer, z, tap):
    """The rest of a Dense or EinsumDense call after its product `z`: the bias,
    the tap (where the output gradient is taken), the activation."""
    if layer.bias is not None:
        z = ops.add(z, layer.bias)
    z = tap(z)
    return layer.activation(z) if layer.activation is not None else z


def _kernel_and_bias(layer, kernel, bias):
    """`{id(variable): gradient}` of a Dense or EinsumDense layer."""
    out = {id(layer.kernel): kernel}
    if layer.bias is not None:
        out[id(layer.bias)] = bias
    return out


class EinsumDenseRule(Rule):
    name = "einsum_dense"

    def applies(self, layer):
        return _keras.runs_its_own_call(
            layer, keras.layers.EinsumDense
        ) and _linear_variables(layer)

    def forward(self, layer, original_call, tap, args, kwargs):
        if not _one_input(args, kwargs):
            return None
        (inputs,) = args
        try:  # an equation with no ghost rule is left to the global fallback
            ghost.parse_einsum(layer.equation, len(inputs.shape))
        except ghost.UnsupportedEquation:
            return None
        z = ops.einsum(layer.equation, inputs, layer.kernel)
        return _biased_activation(layer, z, tap), inputs, {}

    def _bias_axes(self, layer):
        return layer.bias_axes if layer.bias is not None else None

    def sq_norms(self, model, call, g):
        layer = call.layer
        return ghost.einsum_sq_norms(
            layer.equation, call.saved, g, self._bias_axes(layer)
        )

    def clipped_grads(self, model, call, g, c):
        layer = call.layer
        bias_shape = tuple(layer.bias.shape) if layer.bias is not None else None
        kernel, bias = ghost.einsum_clipped_grads(
            layer.equation, call.saved, g, c, self._bias_axes(layer), bias_shape
        )
        return _kernel_and_bias(layer, kernel, bias)


class EmbeddingRule(Rule):
    name = "embedding"

    def applies(self, layer):
        return _keras.runs_its_own_call(layer, keras.layers.Embedding) and [
            id(v) for v in _keras.own_trainable_variables(layer)
        ] == [id(layer.embeddings)]

    def forward(self, layer, original_call, tap, args, kwargs):
        if not _one_input(args, kwargs):
            return None
        out = tap(original_call(*args, **kwargs))
        return out, args[0], {}

    def sq_norms(self, model, call, g):
        return ghost.embedding_sq_norms(call.saved, g)

    def clipped_grads(self, model, call, g, c):
        layer = call.layer
        table = ghost.embedding_clipped_grad(call.saved, g, c, layer.input_dim)
        return {id(layer.embeddings): table}


class LocalFallbackRule(Rule):
    """Any other leaf layer that draws no random numbers: per-example gradients
    of its own variables, `vjp(layer(w, x_i))(g_i)` vectorized over the batch.
    The rest of the model never materializes per-example gradients.

    Takes calls whose positional arguments are tensors (the batch) and whose only
    keyword argument is `training`, and that return one floating tensor."""

    name = "local_fallback"

    def applies(self, layer):
        return not draws_random_numbers(layer)

    def forward(self, layer, original_call, tap, args, kwargs):
        if not args or set(kwargs) - {"training"}:
            return None
        if not all(_is_tensor(t) for t in tree.flatten(args)):
            return None
        out = original_call(*args, **kwargs)
        if not _is_tensor(out) or not _is_float(out):
            return out, None, None
        return tap(out), args, dict(kwargs)

    def _grads(self, model, call, g):
        if "per_example" not in call.cache:
            call.cache["per_example"] = layer_per_example_gradients(
                model, call.layer, call.saved, call.options, g
            )
        return call.cache["per_example"]

    def sq_norms(self, model, call, g):
        total = None
        for pg in self._grads(model, call, g):
            term = squared_norms(pg)
            total = term if total is None else total + term
        return total

    def clipped_grads(self, model, call, g, c):
        out = {}
        grads = self._grads(model, call, g)
        for v, pg in zip(call.layer.trainable_variables, grads):
            out[id(v)] = ops.tensordot(c, ops.cast(pg, "float32"), axes=1)
        return out


def layer_per_example_gradients(model, layer, args, options, g):
    """Each example's gradient of `<layer(args_i), g_i>` with respect to the
    layer's trainable variables: a list of `(B, *variable.shape)` tensors."""
    kwargs = dict(options)
    weights = [ops.stop_gradient(v.value) for v in layer.trainable_variables]
    others = [v.value for v in layer.non_trainable_variables]

    def one(args_i, g_i):
        batch = tree.map_structure(lambda t: ops.expand_dims(t, 0), args_i)

        def output(values):
            out, _ = layer.stateless_call(values, others, *batch, **kwargs)
            return out

        return model._kc_vjp(output, weights, ops.expand_dims(g_i, 0))

    return model._kc_vectorize(one)(tuple(args), g)


def squared_norms(per_example):
    """`(B,)` float32: the squared norm of each example's slice of `(B, ...)`."""
    per_example = ops.cast(per_example, "float32")
    axes = tuple(range(1, len(per_example.shape)))
    squares = ops.square(per_example)
    return ops.sum(squares, axis=axes) if axes else squares


def _is_tensor(x):
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, str)


def _is_float(x):
    return "float" in keras.backend.standardize_dtype(x.dtype)


FAST_RULES = (DenseRule(), EinsumDenseRule(), EmbeddingRule())
FALLBACK = LocalFallbackRule()


def draws_random_numbers(layer):
    """Whether `layer` itself holds a `keras.random.SeedGenerator` (Dropout,
    GaussianNoise, random augmentation layers...)."""
    return any(isinstance(v, keras.random.SeedGenerator) for v in vars(layer).values())


def trainable_batch_normalization(layers):
    """The BatchNormalization layers that train (they mix a batch's examples)."""
    return [
        layer
        for layer in layers
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]


class Plan:
    """Which layers are intercepted, and which variables need the global fallback.

    Args:
        model: a built model.
        fast: `False` sends every variable to the global fallback.

    Attributes:
        leaves: the leaf layers to intercept, each with its rule (`rules`).
        global_ids: ids of the variables for the global fallback (more are
            found while recording: layers called twice, calls no rule takes).
        random_layers: the layers that draw random numbers (a global fallback
            would give every example the same draws).
    """

    def __init__(self, model, fast=True):
        self.model = model
        self.fast = fast
        layers = _keras.sublayers(model)
        self.random_layers = [layer for layer in layers if draws_random_numbers(layer)]
        owners = {}
        for layer in [model] + layers:
            for v in _keras.own_trainable_variables(layer):
                owners[id(v)] = owners.get(id(v), 0) + 1
        self.leaves = []
        self.rules = {}
        global_ids = set()
        for layer in layers:
            own = _keras.own_trainable_variables(layer)
            if not own:
                continue
            nested = any(
                _keras.own_trainable_variables(sub) for sub in _keras.sublayers(layer)
            )
            shared = any(owners[id(v)] > 1 for v in own)
            rule = self._rule(layer) if fast and not nested and not shared else None
            if rule is None:
                global_ids.update(id(v) for v in own)
            else:
                self.leaves.append(layer)
                self.rules[id(layer)] = rule
        global_ids.update(id(v) for v in _keras.own_trainable_variables(model))
        # Variables no layer owns as its own (defensive).
        global_ids.update(id(v) for v in model.trainable_variables if id(v) not in owners)
        self.global_ids = global_ids

    def _rule(self, layer):
        for rule in FAST_RULES:
            if rule.applies(layer):
                return rule
        return FALLBACK if FALLBACK.applies(layer) else None


class Recorder:
    """What one recorded forward pass saw: `calls` (one `Call` per intercepted
    call a rule took) and `declined` (ids of layers with a call no rule took)."""

    def __init__(self, plan, tap):
        self.plan = plan
        self.tap = tap
        self.calls = []
        self.declined = set()
        self.taps = 0

    def _tap(self, t):
        self.taps += 1
        return self.tap(t)

    def _wrap(self, layer, original_call):
        rule = self.plan.rules[id(layer)]

        def call(*args, **kwargs):
            position = self.taps
            found = rule.forward(layer, original_call, self._tap, args, kwargs)
            if found is None:
                self.declined.add(id(layer))
                return original_call(*args, **kwargs)
            out, saved, options = found
            if options is None:  # ran, but its output cannot be tapped
                self.declined.add(id(layer))
                return out
            self.calls.append(Call(layer, rule, saved, options, position))
            return out

        return call

    def split(self):
        """`(calls the rules handle, ids of the variables left to the global
        fallback)`: a layer called more than once, or with a call no rule took,
        has all its calls left out."""
        counts = {}
        for call in self.calls:
            counts[id(call.layer)] = counts.get(id(call.layer), 0) + 1
        left = {lid for lid, n in counts.items() if n > 1} | self.declined
        usable = [call for call in self.calls if id(call.layer) not in left]
        layers = {id(layer): layer for layer in self.plan.leaves}
        ids = {id(v) for lid in left for v in _keras.own_trainable_variables(layers[lid])}
        return usable, ids


@contextlib.contextmanager
def recording(plan, tap):
    """Intercepts the plan's leaf layers while inside; yields the `Recorder`.

    Args:
        plan: a `Plan`.
        tap: `tap(t) -> t` for each tensor whose gradient the rules need (the
            backend's, from `model._kc_grad_wrt`).
    """
    recorder = Recorder(plan, tap)
    replacements = [(layer, recorder._wrap(layer, layer.call)) for layer in plan.leaves]
    with _keras.calls_replaced(replacements):
        yield recorder
