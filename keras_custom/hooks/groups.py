"""Parameter groups: a learning-rate factor per group of variables (`ScaleGradients`),
layer-wise learning-rate decay (`LayerwiseDecay`) and gradient centralization
(`GradientCentralization`), each around a pure `keras.ops` function.

A factor scales either the *update* (`mode="update"`, the default) or the
*gradient* (`mode="gradient"`):

- `"update"`: after the optimizer's step, each variable is put at
  `old + factor * (new - old)`. Every Keras optimizer's step is proportional to
  its learning rate (decoupled weight decay included), so this is exactly a
  per-group learning rate, with any optimizer. The optimizer's state (momentum,
  Adam's moments) sees the gradient as it is, as with PyTorch's parameter groups.
- `"gradient"`: the gradient is multiplied before the optimizer (and before the
  hooks after this one). That is a learning-rate factor for SGD, with or without
  momentum, but *not* for adaptive optimizers: Adam, RMSprop, Adagrad... divide
  the gradient by its own running scale, which cancels a constant factor.
"""

import numbers
import re

import keras
import numpy as np
from keras import ops

from keras_custom import _selection
from keras_custom import _validation
from keras_custom.hook import Hook
from keras_custom.hook import Strength

_SCHEDULE = keras.optimizers.schedules.LearningRateSchedule
MODES = ("update", "gradient")
BLOCK_PATTERN = r"transformer_layer_(\d+)"
_KERNEL = re.compile(r"(^|_)kernel$")


# ------------------------------------------------------------------- functions
def scale_gradients(grads, factors):
    """Multiplies each gradient by its factor.

    Args:
        grads: a list of tensors (`None` entries pass through).
        factors: one scalar (or `None`: unchanged) per gradient.

    Returns:
        The scaled gradients, same order.

    Example:

    >>> out = scale_gradients([keras.ops.array([2.0, -4.0]), None], [0.5, 3.0])
    >>> keras.ops.convert_to_numpy(out[0]).tolist(), out[1]
    ([1.0, -2.0], None)
    """
    return [
        g if g is None or f is None else ops.multiply(g, ops.cast(f, g.dtype))
        for g, f in zip(grads, factors)
    ]


def scale_updates(old, new, factors):
    """`old + factor * (new - old)`: each update scaled by its factor.

    With `factor = 0` the result is `old` exactly; with `factor = 1`, `new` up to
    rounding.

    Args:
        old: the values before the update, a list of tensors.
        new: the values after it, same shapes.
        factors: one scalar (or `None`: `new` unchanged) per pair.

    Returns:
        The scaled-update values, same order.

    Example:

    >>> out = scale_updates([keras.ops.array([1.0])], [keras.ops.array([3.0])], [0.25])
    >>> keras.ops.convert_to_numpy(out[0]).tolist()
    [1.5]
    """
    out = []
    for o, n, f in zip(old, new, factors):
        if f is None:
            out.append(n)
            continue
        step = ops.multiply(ops.subtract(n, o), ops.cast(f, n.dtype))
        out.append(ops.add(o, step))
    return out


def centralize_gradients(grads):
    """Gradient centralization: subtracts from each gradient of rank >= 2 its mean
    over all but the last axis (Yong et al. 2020).

    For a Dense kernel `(in, out)` each output unit's gradient gets zero mean over
    its inputs; for a Conv2D kernel `(kh, kw, in, out)`, over its window and
    input channels. Gradients of rank 0 or 1 (biases) and `None` entries pass
    through.

    Example:

    >>> g = keras.ops.array([[1.0, 2.0], [3.0, 6.0]])
    >>> keras.ops.convert_to_numpy(centralize_gradients([g])[0]).tolist()
    [[-1.0, -2.0], [1.0, 2.0]]

    References:
        Yong, Huang, Hua, Zhang. Gradient Centralization: A New Optimization
        Technique for Deep Neural Networks. ECCV 2020.
        https://arxiv.org/abs/2004.01461
    """
    out = []
    for g in grads:
        if g is None or len(g.shape) < 2:
            out.append(g)
            continue
        axes = tuple(range(len(g.shape) - 1))
        out.append(ops.subtract(g, ops.mean(g, axis=axes, keepdims=True)))
    return out


def layer_ids(model, block_pattern=None):
    """The layer id of each trainable variable and the depth, for layer-wise decay.

    With block names (`block_pattern`, by default `transformer_layer_<i>` as in
    KerasHub backbones, if any variable path has it): a variable of block `i` has
    id `i + 1`; variables before the first block (embeddings) have id 0, after
    the last (final normalization, pooler, task head) id `L + 1` for `L` blocks,
    and any between two blocks the id of the block before them. The depth is
    `L + 1` (BEiT's and ELECTRA's numbering).

    Otherwise, by layer order: each layer of `model.layers` that owns trainable
    weights is one id, in order from 0; a nested `keras.Model` (a Functional or
    Sequential backbone) counts through its own layers, recursively; any other
    layer with sublayers (a block) is one id. The depth is the last id, so the
    last layer (the head) has id `depth`. Weights a model owns directly, not
    through a layer, have id `depth`.

    Args:
        model: a built model.
        block_pattern: a regular expression with one group capturing the block
            index, searched in `variable.path`; `None`: `transformer_layer_(\\d+)`
            where a path has it, else layer order.

    Returns:
        `(ids, depth)`: a list of ints, one per `model.trainable_variables`, and
        an int.

    Example:

    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3),
    ...                           keras.layers.Dense(3), keras.layers.Dense(1)])
    >>> layer_ids(model)
    ([0, 0, 1, 1, 2, 2], 2)
    """
    variables = list(model.trainable_variables)
    if block_pattern is not None or any(
        re.search(BLOCK_PATTERN, v.path) for v in variables
    ):
        return _ids_by_blocks(variables, block_pattern or BLOCK_PATTERN)
    position = {}
    unit = 0
    for layer in _units(model):
        found = False
        for v in layer.trainable_variables:
            if id(v) not in position:
                position[id(v)] = unit
                found = True
        unit += found
    depth = max(unit - 1, 0)
    return [position.get(id(v), depth) for v in variables], depth


def _units(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _units(layer)
        else:
            yield layer


def _ids_by_blocks(variables, pattern):
    blocks = []
    for v in variables:
        match = re.search(pattern, v.path)
        if match is None:
            blocks.append(None)
            continue
        try:
            blocks.append(int(match.group(1)))
        except (IndexError, ValueError):
            raise ValueError(
                "LayerwiseDecay: `block_pattern` must capture the block index "
                f"(digits) in its first group; in {v.path!r} it matched "
                f"{match.group(0)!r}. Received: block_pattern={pattern!r}"
            ) from None
    found = [b for b in blocks if b is not None]
    if not found:
        raise ValueError(
            f"LayerwiseDecay: the `block_pattern` {pattern!r} matches no variable of "
            f"the model. Received: block_pattern={pattern!r}. Variable paths: "
            f"{_selection._listing([v.path for v in variables])}"
        )
    depth = max(found) + 2
    ids = []
    previous = None
    for i, block in enumerate(blocks):
        if block is not None:
            previous = block + 1
            ids.append(previous)
        elif previous is None:
            ids.append(0)
        elif all(b is None for b in blocks[i:]):
            ids.append(depth)
        else:
            ids.append(previous)
    return ids, depth


# ---------------------------------------------------------------------- hooks
class _GroupScaling(Hook):
    """A factor per variable, applied to the update or to the gradient."""

    def __init__(self, mode="update", **kwargs):
        super().__init__(**kwargs)
        self.mode = _validation.one_of(self, "mode", mode, MODES)

    def _factors(self, variables, step):
        """One scalar tensor (or `None`: factor 1) per variable."""
        raise NotImplementedError

    def process_gradients(self, grads, variables, step):
        factors = self._factors(variables, step)
        if self.mode == "gradient":
            return scale_gradients(grads, factors)
        before = [
            (v, ops.copy(v.value), f)
            for v, g, f in zip(variables, grads, factors)
            if f is not None and g is not None
        ]
        # Kept in this step's state, not on the hook: under a tf.distribute
        # strategy each replica runs the step in a thread of its own, with a
        # StepState of its own, and the hook is shared.
        self.step_state.scratch(self)["before"] = before
        return grads

    def after_update(self, model, step):
        before = self.step_state.scratch(self).pop("before", None)
        if not before:
            return
        active = self.is_active(step) if self.has_window else None
        for variable, old, factor in before:
            new = variable.value
            (scaled,) = scale_updates([old], [new], [factor])
            if active is not None:
                scaled = ops.where(active, scaled, new)
            variable.assign(scaled)

    def get_config(self):
        config = super().get_config()
        config["mode"] = self.mode
        return config


@keras.saving.register_keras_serializable(package="keras_custom")
class ScaleGradients(_GroupScaling):
    """A learning-rate factor per group of variables, with any optimizer.

    `factors` maps regular expressions, searched in `variable.path` (as
    `include` elsewhere), to factors. Each trainable variable takes the factor of
    the first pattern that matches it, in the order of the dict; variables no
    pattern matches keep factor 1. A factor is a float >= 0 or a
    `keras.optimizers.schedules.LearningRateSchedule` evaluated at the step; a
    float lives in a variable, so `hook.set_factor(pattern, value)` (from a
    callback, say) takes effect without tracing the step again.

    With `mode="update"` (the default) each group's update is multiplied after the
    optimizer's step: a per-group learning rate, exact for every Keras optimizer
    (see the module docstring), e.g. a pretrained backbone at a tenth of the new
    head's rate. With `mode="gradient"` the gradient is multiplied before the
    optimizer and the hooks after this one; that is a learning-rate factor only
    for SGD (adaptive optimizers cancel it), but it is what a clipping hook placed
    after it sees.

    Order with clipping: in `"update"` mode the factors do not touch the gradient,
    so a clipping hook anywhere in the list clips the gradient of every group as
    computed, and the step it leads to is then scaled. In `"gradient"` mode,
    before a clipping hook the clip sees the scaled gradient (the global norm
    mostly of the large-factor groups); after it, the clipped gradient is scaled.
    Several update-mode hooks (with `LayerwiseDecay`) multiply their factors.

    Args:
        factors: a dict `{pattern: factor}`, not empty. Every pattern must match a
            trainable variable that no earlier pattern takes (checked when the
            hook is built).
        mode: `"update"` or `"gradient"`.
        **kwargs: `start_step`, `stop_step`, `name` (see `Hook`); outside its
            window the hook scales nothing.

    Example:

    >>> hook = ScaleGradients({"backbone": 0.1, "head/bias": 0.0})
    >>> hook.factors
    {'backbone': 0.1, 'head/bias': 0.0}
    >>> hook.set_factor("backbone", 0.5)
    >>> hook.factors["backbone"]
    0.5
    """

    def __init__(self, factors, mode="update", **kwargs):
        super().__init__(mode=mode, **kwargs)
        if not isinstance(factors, dict) or not factors:
            raise ValueError(
                "ScaleGradients: `factors` must be a non-empty dict "
                "{pattern: factor}. Received: "
                f"factors={factors!r}"
            )
        checked = {}
        for pattern, value in factors.items():
            if not isinstance(pattern, str):
                raise TypeError(
                    "ScaleGradients: the keys of `factors` must be regular "
                    "expressions (strings) searched in `variable.path`. Received: "
                    f"factors={factors!r}"
                )
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(
                    f"ScaleGradients: `factors` has an invalid regular expression "
                    f"{pattern!r} ({e}). Received: factors={factors!r}"
                ) from None
            checked[pattern] = self._check_factor(pattern, value)
        self._factor_values = checked
        self._factor_variables = {}
        self._group = {}  # id(variable) -> pattern

    def _check_factor(self, pattern, value):
        return _validation.strength(
            self, f"factors[{pattern!r}]", value, minimum=0.0, inclusive=True
        )

    @property
    def factors(self):
        """`{pattern: factor}`: a copy; change a factor with `set_factor`."""
        return dict(self._factor_values)

    def set_factor(self, pattern, factor):
        """Sets the factor of group `pattern` (from a callback, say).

        A float factor of a built hook lives in a variable: the change takes
        effect at the next step, without tracing the step again. A factor cannot
        change between a float and a schedule once the hook is built (recompile
        with a new hook).
        """
        if pattern not in self._factor_values:
            raise ValueError(
                f"ScaleGradients.set_factor: {pattern!r} is not one of the hook's "
                f"patterns {list(self._factor_values)}. Received: pattern={pattern!r}"
            )
        factor = self._check_factor(pattern, factor)
        if self.built:
            was_schedule = isinstance(self._factor_values[pattern], _SCHEDULE)
            if was_schedule or isinstance(factor, _SCHEDULE):
                raise ValueError(
                    "ScaleGradients.set_factor: a factor cannot change between a "
                    "float and a schedule once the hook is built (the compiled step "
                    "reads one or the other); recompile with a new hook. Received: "
                    f"factors[{pattern!r}]={factor!r}"
                )
        self._factor_values[pattern] = factor
        variable = self._factor_variables.get(pattern)
        if variable is not None:
            variable.assign(float(factor))

    def build(self, model):
        variables = list(model.trainable_variables)
        paths = [v.path for v in variables]
        group = {}
        for pattern in self._factor_values:
            matching = [v for v, p in zip(variables, paths) if re.search(pattern, p)]
            if not matching:
                raise ValueError(
                    f"ScaleGradients: the pattern {pattern!r} matches no trainable "
                    f"variable of the model. Received: factors={self._factor_values!r}. "
                    f"Variable paths: {_selection._listing(paths)}"
                )
            won = [v for v in matching if id(v) not in group]
            if not won:
                raise ValueError(
                    f"ScaleGradients: the pattern {pattern!r} matches only variables "
                    "that earlier patterns already take (the first matching pattern "
                    f"wins): {[v.path for v in matching]}. Received: "
                    f"factors={self._factor_values!r}"
                )
            for v in won:
                group[id(v)] = pattern
        self._group = group
        self._factor_variables = {}
        for i, (pattern, value) in enumerate(self._factor_values.items()):
            if not isinstance(value, _SCHEDULE):
                self._factor_variables[pattern] = self.add_variable(
                    initializer=float(value),
                    name=f"{self.name}_factor_{i}",
                    rolls_back=False,  # never changed by a step
                )

    @property
    def groups(self):
        """`{pattern: [variable paths]}` after `build`: which variables each
        factor scales."""
        out = {p: [] for p in self._factor_values}
        owner = self._owner()
        if owner is not None:
            for v in owner.trainable_variables:
                if id(v) in self._group:
                    out[self._group[id(v)]].append(v.path)
        return out

    def _factors(self, variables, step):
        values = {}
        for pattern, value in self._factor_values.items():
            if isinstance(value, _SCHEDULE):
                values[pattern] = ops.cast(value(step), "float32")
            else:
                values[pattern] = ops.convert_to_tensor(self._factor_variables[pattern])
        return [values.get(self._group.get(id(v))) for v in variables]

    def check_state(self, values):
        position = {id(v): i for i, v in enumerate(self._variables)}
        for pattern, variable in self._factor_variables.items():
            saved = values[position[id(variable)]].item()
            try:
                self._check_factor(pattern, saved)
            except (TypeError, ValueError) as e:
                raise ValueError(f"The file's saved state is refused. {e}") from None
            configured = float(np.float32(self._factor_values[pattern]))
            if saved != configured:
                raise ValueError(
                    f"ScaleGradients(name={self.name!r}): the file's saved state says "
                    f"factors[{pattern!r}]={saved!r}, its configuration says "
                    f"{configured!r}; a file whose configuration and state disagree "
                    "is refused."
                )

    def get_config(self):
        config = super().get_config()
        config["factors"] = {
            p: keras.saving.serialize_keras_object(v) if isinstance(v, _SCHEDULE) else v
            for p, v in self._factor_values.items()
        }
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["factors"] = {
            p: keras.saving.deserialize_keras_object(v) if isinstance(v, dict) else v
            for p, v in config["factors"].items()
        }
        return super().from_config(config)


class _Fraction(Strength):
    """A strength in (0, 1]: a float there or a schedule."""

    def __set__(self, hook, value):
        if (
            isinstance(value, numbers.Real)
            and not isinstance(value, bool)
            and not 0.0 < float(value) <= 1.0
        ):
            raise ValueError(
                f"{type(hook).__name__}: `{self.name}` must be a float in (0, 1] or a "
                f"keras.optimizers.schedules.LearningRateSchedule. "
                f"Received: {self.name}={value!r}"
            )
        super().__set__(hook, value)


@keras.saving.register_keras_serializable(package="keras_custom")
class LayerwiseDecay(_GroupScaling):
    """Layer-wise learning-rate decay, as in BEiT and ELECTRA fine-tuning.

    The variables of layer `i` get the learning-rate factor
    `decay ** (depth - i)`: the head keeps the optimizer's rate, each layer
    below it a `decay` times smaller one, so the pretrained bottom layers move
    least. How layers are counted (`layer_ids`):

    - **KerasHub backbones** (variables under `transformer_layer_<i>`, or your
      own `block_pattern`): embeddings are layer 0, block `i` is layer `i + 1`,
      and what comes after the last block (final norm, pooler, task head) is
      layer `L + 1 = depth` (factor 1), for `L` blocks; BEiT's numbering.
    - **Functional and Sequential models**: each layer of `model.layers` that
      owns trainable weights is one layer, in the model's order (topological for
      Functional); a nested model counts through its own layers; a custom layer
      holding sublayers counts as one. The last one is the head (factor 1).

    `hook.layer_ids` and `hook.factors()` show the result after the hook is
    built. The factors scale the update (`mode="update"`, the default: a true
    learning-rate factor for every optimizer, AdamW included) or the gradient
    (`mode="gradient"`, for SGD only; see `ScaleGradients`).

    Args:
        decay: a float in `(0, 1]` or a `LearningRateSchedule` (the papers use
            0.65-0.9); a float can be changed between steps (`hook.decay = 0.8`).
        block_pattern: a regular expression whose first group captures a block
            index in `variable.path`; it must match. `None`:
            `transformer_layer_(\\d+)` where present, else layer order.
        mode: `"update"` or `"gradient"`.
        **kwargs: `start_step`, `stop_step`, `name` (see `Hook`).

    Example:

    >>> inputs = keras.Input((2,))
    >>> hidden = keras.layers.Dense(3, name="body")(inputs)
    >>> model = kc.Model(inputs, keras.layers.Dense(1, name="head")(hidden))
    >>> hook = LayerwiseDecay(0.5)
    >>> model.compile("adamw", "mse", hooks=[hook])
    >>> hook.factors()
    {'body/kernel': 0.5, 'body/bias': 0.5, 'head/kernel': 1.0, 'head/bias': 1.0}

    References:
        Clark, Luong, Le, Manning. ELECTRA: Pre-training Text Encoders as
        Discriminators Rather Than Generators. ICLR 2020.
        https://arxiv.org/abs/2003.10555

        Bao, Dong, Piao, Wei. BEiT: BERT Pre-Training of Image Transformers.
        ICLR 2022. https://arxiv.org/abs/2106.08254
    """

    decay = _Fraction(minimum=0.0)

    def __init__(self, decay=0.75, block_pattern=None, mode="update", **kwargs):
        super().__init__(mode=mode, **kwargs)
        self.decay = decay
        if block_pattern is not None:
            _validation.patterns(self, "block_pattern", [block_pattern])
            if re.compile(block_pattern).groups < 1:
                raise ValueError(
                    "LayerwiseDecay: `block_pattern` must have a group capturing the "
                    f"block index, e.g. r'block_(\\d+)'. Received: "
                    f"block_pattern={block_pattern!r}"
                )
        self.block_pattern = block_pattern
        self._ids = {}
        self._paths = []
        self.depth = None

    def build(self, model):
        variables = list(model.trainable_variables)
        ids, depth = layer_ids(model, self.block_pattern)
        self._ids = {id(v): i for v, i in zip(variables, ids)}
        self._paths = [(v.path, i) for v, i in zip(variables, ids)]
        self.depth = depth

    @property
    def layer_ids(self):
        """`{variable path: layer id}` after `build` (see `layer_ids`)."""
        return dict(self._paths)

    def factors(self, step=None):
        """`{variable path: factor}` after `build`, for a float decay (a schedule
        is evaluated at `step`, default 0)."""
        decay = self.decay
        if isinstance(decay, _SCHEDULE):
            decay = float(ops.convert_to_numpy(decay(0 if step is None else step)))
        return {path: float(decay) ** (self.depth - i) for path, i in self._paths}

    def _factors(self, variables, step):
        decay = self.strength("decay", step)
        powers = {}
        out = []
        for v in variables:
            i = self._ids.get(id(v))
            if i is None or i >= self.depth:
                out.append(None)
                continue
            exponent = self.depth - i
            if exponent not in powers:
                powers[exponent] = ops.power(decay, float(exponent))
            out.append(powers[exponent])
        return out

    def get_config(self):
        config = super().get_config()
        config["block_pattern"] = self.block_pattern
        return config


@keras.saving.register_keras_serializable(package="keras_custom")
class GradientCentralization(Hook):
    """Gradient centralization: each kernel's gradient minus its mean over all but
    the last axis (Yong et al. 2020).

    Acts on trainable kernels of rank >= 2 (Dense, Conv, EinsumDense, RNN
    kernels: those named `kernel` or `*_kernel`); biases, normalization weights
    and embedding tables are left alone. `include` replaces that selection
    (among the variables of rank >= 2), `exclude` narrows it. Put it before
    clipping hooks, so that they clip the gradient the optimizer will see.

    Args:
        include: regular expression(s) searched in `variable.path`.
        exclude: regular expression(s).
        **kwargs: `start_step`, `stop_step`, `name` (see `Hook`).

    Example:

    >>> GradientCentralization(exclude="head").get_config()["exclude"]
    ['head']

    References:
        Yong, Huang, Hua, Zhang. Gradient Centralization: A New Optimization
        Technique for Deep Neural Networks. ECCV 2020.
        https://arxiv.org/abs/2004.01461
    """

    def __init__(self, include=None, exclude=None, **kwargs):
        super().__init__(**kwargs)
        self.include = _validation.patterns(self, "include", include)
        self.exclude = _validation.patterns(self, "exclude", exclude)
        self._selected = set()

    def build(self, model):
        variables = list(model.trainable_variables)
        candidates = [v for v in variables if len(v.shape) >= 2]
        for pattern in self.include or ():
            low = [
                v.path
                for v in variables
                if len(v.shape) < 2 and re.search(pattern, v.path)
            ]
            if low and not any(re.search(pattern, v.path) for v in candidates):
                raise ValueError(
                    f"GradientCentralization: the `include` pattern {pattern!r} "
                    f"matches only variables of rank < 2 ({low}); gradient "
                    f"centralization needs rank >= 2. Received: include={pattern!r}"
                )
        chosen = _selection.select(
            self,
            candidates,
            self.include,
            self.exclude,
            default=lambda v: bool(_KERNEL.search(v.path.rsplit("/", 1)[-1])),
        )
        if not chosen:
            raise ValueError(
                "GradientCentralization: no variable to centralize (the model has no "
                "trainable kernel of rank >= 2, or `exclude` removed them all). "
                f"Received: include={self.include!r}, exclude={self.exclude!r}"
            )
        self._selected = {id(v) for v in chosen}

    @property
    def centralized_paths(self):
        """The paths of the variables whose gradients are centralized (after
        `build`)."""
        owner = self._owner()
        if owner is None:
            return []
        return [v.path for v in owner.trainable_variables if id(v) in self._selected]

    def process_gradients(self, grads, variables, step):
        picked = [
            i
            for i, (g, v) in enumerate(zip(grads, variables))
            if g is not None and id(v) in self._selected
        ]
        out = list(grads)
        for i, g in zip(picked, centralize_gradients([grads[i] for i in picked])):
            out[i] = g
        return out

    def get_config(self):
        config = super().get_config()
        config.update(
            include=None if self.include is None else list(self.include),
            exclude=None if self.exclude is None else list(self.exclude),
        )
        return config
