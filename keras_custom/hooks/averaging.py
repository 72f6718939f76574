"""Weight averaging: an average of the weights along training (`WeightAverage`, an
exponential or an equal-weight average), Lookahead's slow weights (`Lookahead`), and
`recompute_batch_norm`, which refreshes BatchNormalization statistics for averaged
weights.

Both hooks act in `after_update`, on the weights the optimizer just produced, and
only where the update was applied: a step skipped by `SkipNonFinite` (or by a loss
scale overflow) moves no average and no slow weight.
"""

import contextlib
import itertools
import warnings

import keras
import numpy as np
from keras import ops

from keras_custom import _keras
from keras_custom import _validation
from keras_custom.hook import Hook

KINDS = ("ema", "swa")
_DEFAULT_DECAY = 0.999


def _float32(x):
    if keras.backend.standardize_dtype(x.dtype) == "float32":
        return x
    return ops.cast(x, "float32")


def _same_dtype(x, like):
    if keras.backend.standardize_dtype(x.dtype) == keras.backend.standardize_dtype(
        like.dtype
    ):
        return x
    return ops.cast(x, like.dtype)


def ema_decay(count, decay=_DEFAULT_DECAY, warmup=True):
    """The decay of an exponential average's next update, after `count` updates.

    `0` when `count` is 0: the first update copies the weights (the average starts
    where the weights are, with no bias toward its initial value). Then `decay`,
    or with `warmup`, `min(decay, (1 + count) / (10 + count))`, which lets the
    average follow the weights closely at first (as TensorFlow's
    `ExponentialMovingAverage(num_updates=...)` and timm's EMA do).

    Args:
        count: the number of updates already in the average (an integer or an
            integer tensor).
        decay: the decay once warmed up, in `[0, 1)`.
        warmup: whether to warm the decay up.

    Returns:
        A float32 scalar tensor.

    Example:

    >>> [round(float(ema_decay(n, 0.999)), 4) for n in (0, 1, 2, 100, 10_000)]
    [0.0, 0.1818, 0.25, 0.9182, 0.999]
    >>> float(ema_decay(1, 0.9, warmup=False))
    0.8999999761581421
    """
    count = ops.cast(count, "float32")
    decay = ops.cast(decay, "float32")
    if warmup:
        decay = ops.minimum(decay, (1.0 + count) / (10.0 + count))
    return ops.where(ops.greater(count, 0.0), decay, ops.zeros_like(decay))


def swa_decay(count):
    """`count / (count + 1)`: the decay that makes a running average an equal-weight
    mean (the next value gets weight `1 / (count + 1)`).

    Example:

    >>> [float(swa_decay(n)) for n in (0, 1, 3)]
    [0.0, 0.5, 0.75]
    """
    count = ops.cast(count, "float32")
    return count / (count + 1.0)


def moving_average(averages, values, decay):
    """`decay * average + (1 - decay) * value` for each pair.

    Computed in float32 and returned in each average's dtype. With `decay = 0`
    the result is `value` exactly.

    Args:
        averages: a list of tensors.
        values: a list of tensors, same shapes.
        decay: a scalar in `[0, 1]`.

    Returns:
        The new averages, same order.

    Example:

    >>> out = moving_average([keras.ops.array([0.0, 2.0])],
    ...                      [keras.ops.array([1.0, 4.0])], 0.75)
    >>> keras.ops.convert_to_numpy(out[0]).tolist()
    [0.25, 2.5]
    """
    decay = ops.cast(decay, "float32")
    keep = 1.0 - decay
    out = []
    for average, value in zip(averages, values):
        new = ops.add(
            ops.multiply(decay, _float32(average)), ops.multiply(keep, _float32(value))
        )
        out.append(_same_dtype(new, average))
    return out


def lookahead_step(slow, fast, alpha):
    """Lookahead's synchronization: `slow + alpha * (fast - slow)` for each pair.

    Computed in float32 and returned in each slow weight's dtype.

    Example:

    >>> out = lookahead_step([keras.ops.array([0.0, 2.0])],
    ...                      [keras.ops.array([1.0, 4.0])], 0.5)
    >>> keras.ops.convert_to_numpy(out[0]).tolist()
    [0.5, 3.0]
    """
    alpha = ops.cast(alpha, "float32")
    out = []
    for s, f in zip(slow, fast):
        s32 = _float32(s)
        new = ops.add(s32, ops.multiply(alpha, ops.subtract(_float32(f), s32)))
        out.append(_same_dtype(new, s))
    return out


def _is_float(variable):
    return "float" in keras.backend.standardize_dtype(variable.dtype)


def _all(conditions):
    """The logical and of boolean tensors (`None` for none: always)."""
    out = None
    for c in conditions:
        out = c if out is None else ops.logical_and(out, c)
    return out


def _copy(variable):
    """A fresh copy of `variable`'s value: assigning one variable's value to
    another would make them share a buffer, which JAX's `fit` (donating every
    state buffer to the step) refuses."""
    return ops.copy(variable.value)


def _sync(model):
    """Makes the model's variables current (on JAX, `fit` keeps its state
    outside them during an epoch)."""
    sync = getattr(model, "_kc_sync_state", None)
    if sync is not None:
        sync()


@keras.saving.register_keras_serializable(package="keras_custom")
class WeightAverage(Hook):
    """An average of the weights along training: exponential (EMA) or equal (SWA).

    After each optimizer update, the hook folds the new weights into an average
    it keeps in its own variables (hook state: saved in `.keras` files, restored
    by `load_model`, and a resumed run continues it exactly).

    - `kind="ema"`: an exponential moving average,
      `average = d * average + (1 - d) * weights`. The first update copies the
      weights; the update after `n` updates uses `d = decay`, or with
      `warmup=True`, `d = min(decay, (1 + n) / (10 + n))` (the warm-up of
      TensorFlow's `ExponentialMovingAverage` and timm), so that early averages
      are not dominated by the first, untrained weights.
    - `kind="swa"`: stochastic weight averaging, the equal-weight mean of the
      weights at the updates it takes (`d = n / (n + 1)`). It is usually started
      late (`start_step`) and taken once per epoch (`every` = the steps per
      epoch), with a constant or cyclic learning rate. Averaged weights do not
      match the BatchNormalization statistics of any single model: after
      training, recompute them with `recompute_batch_norm(model, x)` on the
      averaged weights (see its docstring).

    The average is updated after every `every`-th update counted from
    `start_step` (after steps `start_step + every - 1`, `start_step + 2 * every - 1`,
    ...), while `start_step <= step < stop_step`, and only where the update was
    applied: a step skipped by `SkipNonFinite` or by a loss-scale overflow moves
    nothing. With gradient accumulation it sees each real update once.

    Unlike `keras.optimizers.Optimizer(use_ema=True)`, it can warm the decay up,
    average BatchNormalization statistics and other non-trainable float weights
    (`include_non_trainable=True`), start late, and be used without replacing
    the model's weights:

    - `with hook.averaged(model): model.evaluate(...)` swaps the average in
      and puts the model's own weights back afterwards (bit-identical);
    - `validate_with_average=True`: `fit` validates with the average (the
      `val_*` logs are the average's; callbacks such as `EarlyStopping` and
      `ModelCheckpoint(monitor="val_loss")` see them);
    - `swap_at_end=True`: at the end of `fit` the model's weights are replaced by
      the average (as Keras does with `use_ema=True`); the weights the optimizer
      reached are then gone, and a later `fit` continues from the average.

    Until the first update of the average there is nothing to swap in: the
    model's own weights are used (and `swap_at_end` warns).

    Put it after the hooks that change weights in `after_update` (`Freeze`,
    `Lookahead`, `ScaleGradients`), so that it averages the weights they leave.
    It costs one copy of the averaged weights in memory and one multiply-add of
    them per update.

    Args:
        decay: the EMA decay once warmed up, in `[0, 1)` (`kind="ema"` only).
        warmup: warm the EMA decay up (`kind="ema"` only).
        include_non_trainable: also average the model's non-trainable float
            weights (BatchNormalization's moving mean and variance, frozen
            layers' weights). Random seeds and integer counters are never
            averaged.
        kind: `"ema"` or `"swa"`.
        every: update the average after every `every`-th optimizer update (an
            integer >= 1).
        validate_with_average: validate with the average during `fit`.
        swap_at_end: replace the model's weights with the average when `fit`
            ends.
        **kwargs: `start_step`, `stop_step`, `name` (see `Hook`).

    Example:

    >>> import numpy as np
    >>> model = kc.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> ema = kc.hooks.WeightAverage(decay=0.9)
    >>> model.compile("sgd", "mse", hooks=[ema])
    >>> x, y = np.ones((8, 3), "float32"), np.zeros((8, 1), "float32")
    >>> _ = model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    >>> ema.count
    4
    >>> with ema.averaged(model):
    ...     averaged_loss = model.evaluate(x, y, verbose=0)
    >>> bool(averaged_loss != model.evaluate(x, y, verbose=0))
    True

    References:
        Polyak, Juditsky. Acceleration of Stochastic Approximation by Averaging.
        SIAM J. Control and Optimization, 1992.
        https://doi.org/10.1137/0330046

        Izmailov, Podoprikhin, Garipov, Vetrov, Wilson. Averaging Weights Leads
        to Wider Optima and Better Generalization. UAI 2018.
        https://arxiv.org/abs/1803.05407
    """

    def __init__(
        self,
        decay=_DEFAULT_DECAY,
        warmup=True,
        include_non_trainable=True,
        kind="ema",
        every=1,
        validate_with_average=False,
        swap_at_end=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.kind = _validation.one_of(self, "kind", kind, KINDS)
        self.decay = _validation.interval(self, "decay", decay, 0.0, 1.0, high_open=True)
        self.warmup = _validation.boolean(self, "warmup", warmup)
        if self.kind == "swa" and (self.decay != _DEFAULT_DECAY or not self.warmup):
            raise ValueError(
                "WeightAverage: `decay` and `warmup` set the exponential average "
                "(kind='ema'); kind='swa' is an equal-weight mean. Received: "
                f"kind='swa', decay={decay!r}, warmup={warmup!r}"
            )
        self.include_non_trainable = _validation.boolean(
            self, "include_non_trainable", include_non_trainable
        )
        self.every = _validation.integer(self, "every", every, 1, _validation.INT32_MAX)
        self.validate_with_average = _validation.boolean(
            self, "validate_with_average", validate_with_average
        )
        self.swap_at_end = _validation.boolean(self, "swap_at_end", swap_at_end)
        self._sources = []
        self._averages = []
        self._count = None
        self._callback = (
            _UseAverage(self) if (validate_with_average or swap_at_end) else None
        )

    # ------------------------------------------------------------------ stages
    def build(self, model):
        sources = list(model.trainable_variables)
        if self.include_non_trainable:
            seen = {id(v) for v in sources}
            sources += [
                v
                for v in model.non_trainable_weights
                if _is_float(v) and id(v) not in seen
            ]
        if not sources:
            raise ValueError(
                "WeightAverage: the model has no weights to average (no trainable "
                "weights, and no float non-trainable ones with "
                f"include_non_trainable={self.include_non_trainable})."
            )
        self._sources = sources
        self._averages = [
            self.add_variable(
                shape=v.shape,
                dtype=v.dtype,
                name=f"{self.name}_average_{i}",
                rolls_back=False,  # moved only where the update applied (below)
            )
            for i, v in enumerate(sources)
        ]
        self._count = self.add_variable(
            dtype="int32", name=f"{self.name}_count", rolls_back=False
        )

    def after_update(self, model, step):
        conditions = []
        if self.has_window:
            conditions.append(self.is_active(step))
        if self.every > 1:
            # (step - start_step + 1) % every == 0, without overflowing step's dtype
            phase = (self.start_step - 1) % self.every
            conditions.append(ops.equal(ops.mod(step, self.every), phase))
        conditions.append(self.step_state.should_apply())
        due = _all(c for c in conditions if c is not None)

        count = self._count.value
        decay = (
            ema_decay(count, self.decay, self.warmup)
            if self.kind == "ema"
            else swa_decay(count)
        )
        olds = [a.value for a in self._averages]
        news = moving_average(olds, [v.value for v in self._sources], decay)
        new_count = ops.add(count, ops.ones_like(count))
        if due is not None:
            news = [ops.where(due, n, o) for n, o in zip(news, olds)]
            new_count = ops.where(due, new_count, count)
        for average, new in zip(self._averages, news):
            average.assign(new)
        self._count.assign(new_count)

    def callbacks(self):
        return [] if self._callback is None else [self._callback]

    # ------------------------------------------------------- using the average
    @property
    def count(self):
        """How many updates the average holds (an int; 0 before the first).

        On JAX, read it outside `fit` or from an epoch-level callback: during an
        epoch `fit` keeps the state outside the variables.
        """
        self._require_built("count")
        return int(ops.convert_to_numpy(self._count.value))

    @property
    def averaged_variables(self):
        """The model's variables the hook averages, in order (after `build`)."""
        return list(self._sources)

    def average_of(self, variable):
        """The average of the model variable `variable` (a `keras.Variable` of the
        hook, with the variable's shape and dtype)."""
        self._require_built("average_of")
        for source, average in zip(self._sources, self._averages):
            if source is variable:
                return average
        raise ValueError(
            f"WeightAverage.average_of: {getattr(variable, 'path', variable)!r} is not "
            "a variable this hook averages (see `averaged_variables`)."
        )

    @contextlib.contextmanager
    def averaged(self, model=None):
        """A context in which `model`'s weights are the average.

        The model's own weights are put back when the context exits (also on an
        exception), bit-identical. Do not train inside it. Before the first
        update of the average, the model keeps its own weights.

        Args:
            model: the model the hook is compiled with (default: that model).

        Yields:
            The model.
        """
        model = self._model_of(model, "averaged")
        _sync(model)
        if self.count == 0:
            yield model
            return
        own = [ops.convert_to_numpy(v.value) for v in self._sources]
        try:
            for source, average in zip(self._sources, self._averages):
                source.assign(_copy(average))
            yield model
        finally:
            for source, value in zip(self._sources, own):
                source.assign(value)

    def assign_average(self, model=None):
        """Replaces `model`'s weights with the average, for good (what
        `swap_at_end=True` does when `fit` ends).

        Raises:
            ValueError: when nothing has been averaged yet.
        """
        model = self._model_of(model, "assign_average")
        _sync(model)
        if self.count == 0:
            raise ValueError(
                f"WeightAverage(name={self.name!r}).assign_average: nothing has been "
                f"averaged yet (start_step={self.start_step}, every={self.every})."
            )
        for source, average in zip(self._sources, self._averages):
            source.assign(_copy(average))

    def _model_of(self, model, what):
        owner = self._owner()
        if model is None:
            model = owner
        if owner is None or model is not owner:
            raise ValueError(
                f"WeightAverage.{what}: `model` must be the model this hook is "
                "compiled with (a hook holds the average of one model). Received: "
                f"model={getattr(model, 'name', model)!r}"
            )
        self._require_built(what)
        return model

    def _require_built(self, what):
        if not self.built:
            raise RuntimeError(
                f"WeightAverage.{what}: the hook is not built yet: compile a model "
                "with it (and train) first."
            )

    # -------------------------------------------------------------- saving
    def check_state(self, values):
        count = int(values[-1])
        if count < 0:
            raise ValueError(
                f"WeightAverage(name={self.name!r}): the file's saved count of "
                f"averaged updates must be >= 0. Received: count={count}"
            )

    def get_config(self):
        config = super().get_config()
        config.update(
            decay=self.decay,
            warmup=self.warmup,
            include_non_trainable=self.include_non_trainable,
            kind=self.kind,
            every=self.every,
            validate_with_average=self.validate_with_average,
            swap_at_end=self.swap_at_end,
        )
        return config


class _UseAverage(keras.callbacks.Callback):
    """`fit`'s part of `WeightAverage`: the average around validation
    (`validate_with_average`) and in the model at the end (`swap_at_end`)."""

    def __init__(self, hook):
        super().__init__()
        self.hook = hook
        self._context = None

    def on_test_begin(self, logs=None):
        if self.hook.validate_with_average and self._context is None:
            context = self.hook.averaged(self.model)
            context.__enter__()
            self._context = context

    def on_test_end(self, logs=None):
        context, self._context = self._context, None
        if context is not None:
            context.__exit__(None, None, None)

    def on_train_end(self, logs=None):
        if not self.hook.swap_at_end:
            return
        model = self.model
        _sync(model)
        if self.hook.count == 0:
            warnings.warn(
                f"WeightAverage(name={self.hook.name!r}, swap_at_end=True): nothing "
                f"was averaged during `fit` (start_step={self.hook.start_step}, "
                f"every={self.hook.every}); the model keeps its weights.",
                stacklevel=2,
            )
            return
        self.hook.assign_average(model)


@keras.saving.register_keras_serializable(package="keras_custom")
class Lookahead(Hook):
    """Lookahead: slow weights pulled toward the fast weights every `k` steps.

    The optimizer (any: SGD, Adam, ...) updates the model's weights, the *fast*
    weights, as usual. The hook keeps *slow* weights in its own variables; after
    every `k`-th applied update it moves them toward the fast weights and restarts
    the fast weights from there:

        slow = slow + alpha * (fast - slow);  fast = slow

    The slow weights start as the model's weights when the hook's window begins
    (at the first step, or at `start_step`), and again at the start of each cycle
    of `k` updates (where fast == slow). A step skipped by `SkipNonFinite` (or a
    loss-scale overflow) does not count: nothing moves, and the cycle is exactly
    that of the run without the bad batch. The optimizer's own state (momentum,
    Adam's moments) is kept across synchronizations, as in the paper. Slow
    weights and the position in the cycle are hook state (saved, restored).

    Put it after hooks that change the weights in `after_update` (`Freeze`,
    `ScaleGradients`) and before `WeightAverage`. It costs one copy of the
    trainable weights in memory.

    Args:
        k: the number of fast updates per cycle (an integer >= 1; the paper uses
            5 or 10).
        alpha: the slow step size, a float in `(0, 1]` (the paper uses 0.5 or
            0.8; `alpha=1` makes it a no-op).
        **kwargs: `start_step`, `stop_step`, `name` (see `Hook`).

    Example:

    >>> Lookahead(k=5, alpha=0.5).get_config()["k"]
    5

    References:
        Zhang, Lucas, Hinton, Ba. Lookahead Optimizer: k steps forward, 1 step
        back. NeurIPS 2019. https://arxiv.org/abs/1907.08610
    """

    def __init__(self, k=5, alpha=0.5, **kwargs):
        super().__init__(**kwargs)
        self.k = _validation.integer(self, "k", k, 1, _validation.INT32_MAX)
        self.alpha = _validation.interval(self, "alpha", alpha, 0.0, 1.0, low_open=True)
        self._fast = []
        self._slow = []
        self._count = None

    def build(self, model):
        self._fast = list(model.trainable_variables)
        self._slow = [
            self.add_variable(
                shape=v.shape,
                dtype=v.dtype,
                name=f"{self.name}_slow_{i}",
                rolls_back=False,  # moved only where the update applied (below)
            )
            for i, v in enumerate(self._fast)
        ]
        # Applied updates since the last synchronization, in [0, k).
        self._count = self.add_variable(
            dtype="int32", name=f"{self.name}_count", rolls_back=False
        )

    def process_gradients(self, grads, variables, step):
        # At the start of a cycle the slow weights are the fast ones: after a
        # synchronization this copies equal values; at the first cycle (or after
        # `compile` on a model whose weights were set since) it starts them.
        start = ops.equal(self._count.value, 0)
        for slow, fast in zip(self._slow, self._fast):
            slow.assign(ops.where(start, fast.value, slow.value))
        return grads

    def after_update(self, model, step):
        conditions = [self.step_state.should_apply()]
        if self.has_window:
            conditions.append(self.is_active(step))
        counts = _all(c for c in conditions if c is not None)
        count = self._count.value
        n = ops.add(count, ops.ones_like(count))
        if counts is not None:
            n = ops.where(counts, n, count)
        sync = ops.greater_equal(n, self.k)
        slows = [s.value for s in self._slow]
        fasts = [f.value for f in self._fast]
        new = lookahead_step(slows, fasts, self.alpha)
        for variable, value, old in zip(self._slow, new, slows):
            variable.assign(ops.where(sync, value, old))
        for variable, value, old in zip(self._fast, new, fasts):
            variable.assign(ops.where(sync, value, old))
        self._count.assign(ops.where(sync, ops.zeros_like(n), n))

    @property
    def slow_variables(self):
        """The slow weights, in the order of the model's trainable variables."""
        return list(self._slow)

    def check_state(self, values):
        count = int(values[-1])
        if not 0 <= count < self.k:
            raise ValueError(
                f"Lookahead(name={self.name!r}): the file's saved position in the "
                f"cycle must be from 0 to {self.k - 1} (k={self.k}). "
                f"Received: count={count}"
            )

    def get_config(self):
        config = super().get_config()
        config.update(k=self.k, alpha=self.alpha)
        return config


# ------------------------------------------------------------------ BatchNorm
def recompute_batch_norm(model, x, batch_size=32, steps=None):
    """Recomputes the moving statistics of the model's BatchNormalization layers.

    Averaged weights (`WeightAverage`, SWA above all) do not match the moving
    mean and variance any single model had along training. This runs the model
    once over `x` in training mode, after resetting every trainable
    `BatchNormalization` layer's moving mean to 0 and variance to 1, with the
    layers' momentum set so that the statistics become the plain mean over the
    batches of the batch statistics (as PyTorch's `torch.optim.swa_utils.update_bn`
    does). Only the forward pass runs: no weight, optimizer or hook state changes
    (random layers such as `Dropout` draw new numbers). Layers with
    `trainable=False` keep their statistics, as they do in training.

    Use it on the averaged weights: after `hook.assign_average(model)` (or
    `swap_at_end=True`) for good, or inside `with hook.averaged(model): ...` for
    an evaluation. With `include_non_trainable=True` (the default) the context
    swaps the statistics too: the recomputed ones serve inside it, and the
    model's own come back, bit-identical, when it exits. (With `False` they are
    not the context's to restore: the recomputed statistics would stay.)

    Args:
        model: a built model with BatchNormalization layers.
        x: the inputs: a NumPy array or tensor (or a dict / list of them, for
            several inputs), cut into batches of `batch_size`; or an iterable of
            batches (a `tf.data.Dataset`, a `keras.utils.PyDataset`, a PyTorch
            `DataLoader`, a generator), each `x` or a tuple `(x, y, ...)`.
        batch_size: the batch size for array inputs.
        steps: stop after this many batches (`None`: all; needed for an
            endless dataset).

    Returns:
        The number of batches used.

    Example:

    >>> import numpy as np
    >>> model = kc.Sequential([keras.Input((3,)), keras.layers.Dense(4),
    ...                        keras.layers.BatchNormalization()])
    >>> x = np.arange(24, dtype="float32").reshape(8, 3)
    >>> recompute_batch_norm(model, x, batch_size=4)
    2

    References:
        Izmailov, Podoprikhin, Garipov, Vetrov, Wilson. Averaging Weights Leads
        to Wider Optima and Better Generalization. UAI 2018.
        https://arxiv.org/abs/1803.05407
    """
    name = "recompute_batch_norm"
    batch_size = _validation.integer(name, "batch_size", batch_size, 1)
    steps = _validation.optional_int(name, "steps", steps, 1)
    layers = [
        layer
        for layer in _keras.all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]
    if not layers:
        raise ValueError(
            f"{name}: the model has no BatchNormalization layer with "
            "trainable=True (a frozen one keeps its statistics). "
            f"Received: model={model.name!r}"
        )
    for layer in layers:
        if getattr(layer, "renorm", False):
            raise ValueError(
                f"{name}: layer {layer.name!r} uses batch renormalization "
                "(renorm=True), whose statistics this cannot recompute."
            )
    batches = _batches(x, batch_size)
    first = next(batches, None)
    if first is None:
        raise ValueError(f"{name}: `x` holds no batch. Received: x={x!r}")
    _sync(model)
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        mean, variance = layer.moving_mean, layer.moving_variance
        mean.assign(ops.zeros(mean.shape, mean.dtype))
        variance.assign(ops.ones(variance.shape, variance.dtype))
    count = 0
    try:
        for batch in itertools.chain([first], batches):
            count += 1
            for layer in layers:
                layer.momentum = (count - 1) / count
            model(batch, training=True)
            if steps is not None and count >= steps:
                break
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return count


def _is_array(value):
    return isinstance(value, np.ndarray) or ops.is_tensor(value)


def _batches(x, batch_size):
    """Model inputs, batch by batch (see `recompute_batch_norm`)."""
    leaves = keras.tree.flatten(x)
    if leaves and all(_is_array(leaf) for leaf in leaves):
        n = int(leaves[0].shape[0])
        for start in range(0, n, batch_size):
            yield keras.tree.map_structure(lambda t: t[start : start + batch_size], x)
        return
    if isinstance(x, keras.utils.PyDataset):
        items = (x[i] for i in range(len(x)))
    else:
        items = iter(x)
    for item in items:
        if isinstance(item, (tuple, list)):
            item = keras.utils.unpack_x_y_sample_weight(tuple(item))[0]
        yield keras.tree.map_structure(
            lambda t: t if ops.is_tensor(t) else np.asarray(t), item
        )
