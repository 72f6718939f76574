"""Differentially private training (DP-SGD) as a hook."""

import numbers
import secrets
import warnings

import keras
import numpy as np
from keras import ops

from keras_custom import _keras
from keras_custom import _validation
from keras_custom.hook import Hook
from keras_custom.hooks.noise import add_gradient_noise
from keras_custom.privacy import accounting
from keras_custom.privacy import capture
from keras_custom.privacy import clipping
from keras_custom.step import loss_scale

LOG_NAME = "epsilon"
METHODS = ("fast", "vectorized")
# Stages of the model that must be ours: a user's override would see (or
# compute) gradients that are not private.
_OURS = ("train_step", "forward_pass", "process_gradients")


@keras.saving.register_keras_serializable(package="keras_custom")
class DifferentialPrivacy(Hook):
    """Differentially private training: DP-SGD (Abadi et al. 2016) on any backend.

    Each step, each example's gradient (over all trainable variables together)
    is clipped to norm `l2_norm_clip` (multiplied by `C / max(norm, C)`); the
    clipped gradients are summed, Gaussian noise of standard deviation
    `noise_multiplier * l2_norm_clip` is added to each coordinate, and the result
    is divided by the batch size: the batch's own size (`fit`'s fixed-size batches;
    the short last batch divides by its own size), or `expected_batch_size` when
    given (Poisson sampling, `keras_custom.privacy.poisson_batches`). With
    `noise_multiplier=0` and a clip no example reaches, the update is that of
    plain training.

    Where it runs: it computes the step's gradients itself
    (`Hook.compute_gradients`: the clipped mean, in one backward pass for Dense,
    EinsumDense and Embedding layers, from vectorized per-example gradients
    elsewhere) and adds the noise as the **first** gradient hook: `compile`
    refuses a hook before it that processes gradients (it would see gradients
    that are not private). Hooks after it see the private gradient. The gradient
    of a loss term that does not depend on the data (kernel regularizers,
    `WeightPenalty`) is added whole, unclipped: it costs no privacy.

    Accounting: with `num_examples` and `delta`, `fit` logs `epsilon`, the
    epsilon spent after the last step of each epoch (computed at the epoch's end,
    in Python), for the (epsilon, `delta`) guarantee of the Poisson-subsampled
    Gaussian mechanism (`keras_custom.privacy.epsilon`) with sample rate
    `expected_batch_size / num_examples`, or, without `expected_batch_size`,
    (largest batch seen) / `num_examples`. **That accounting assumes Poisson
    sampling.** `fit`'s shuffled fixed-size batches are not Poisson-sampled: the
    figure is then the usual approximation, not a proven bound (it can
    under-state the privacy spent; a warning says so). Feed
    `poisson_batches(..., expected_batch_size=b)` and pass the same
    `expected_batch_size=b` for a guarantee. The hook's step count is part of its
    saved state, so epsilon continues across a save and reload.

    With `target_epsilon`, `fit` refuses to start when its first epoch would
    exceed the budget, and stops at the end of the last epoch that keeps within
    it (`fit` must know its number of steps per epoch).

    The guarantee covers the weights (and what is computed from them); the
    logged loss and metrics are computed from the data without noise. It holds
    only if the noise is secret: with `seed=None` it is drawn from the operating
    system's entropy; a `.keras` file of the model with this hook holds the noise
    generator's state (to resume exactly), from which the noise added so far can
    be regenerated: keep such files as private as the data, and publish weights
    (`model.save_weights`) or a copy compiled without the hook.

    Refused (with an error naming the layer, hook or argument): a trainable
    `BatchNormalization` (it mixes the examples of a batch; a frozen one runs in
    inference mode and is accepted), activity regularizers and other
    data-dependent `model.losses`, hooks whose loss term reads the batch
    (`Hook.loss_term_uses_data`), models with several outputs or a masked output,
    losses that do not average over the batch, mixed precision and loss scaling,
    gradient accumulation, `tf.distribute` replicas and `keras.distribution`, a
    model whose `train_step`, `forward_pass`, `process_gradients` or
    `compute_loss` is overridden, a second gradient pass (`SharpnessAware`), and
    `model.apply_hooks` (its gradients are not clipped per example). Random
    layers (Dropout) are accepted where each example's gradient comes from the
    batched forward pass (always, except for variables that need the global
    fallback: layers called twice or shared, layers with trainable sublayers).

    Args:
        l2_norm_clip: `C`, the largest norm an example's gradient keeps, a float
            > 0.
        noise_multiplier: `sigma`, the noise's standard deviation over `C`, a
            float >= 0 (0: clipping only, no privacy).
        num_examples: the number of training examples the batches are drawn from
            (with `validation_split`, the training part), for the accounting.
        delta: the delta of the (epsilon, delta) guarantee, in (0, 1), usually
            below `1 / num_examples`. Give both `num_examples` and `delta` to log
            `epsilon`, or neither.
        seed: an integer for reproducible noise (tests), or `None` (default) for a
            secret seed from the operating system.
        expected_batch_size: the expected size of Poisson-sampled batches: the
            divisor of the noisy sum and the accounting's sample rate numerator.
        target_epsilon: a privacy budget (> 0) that `fit` keeps within; needs
            `num_examples` and `delta`.
        accountant: `"pld"` (privacy loss distributions, tight, about a second
            per epoch end) or `"rdp"` (Rényi DP, a faster upper bound).
        method: `"fast"` (ghost norms where a layer has them) or `"vectorized"`
            (per-example gradients of every variable: slower, for checks).
        name: the hook's name.

    Example:

    ```python
    import keras
    import numpy as np
    import keras_custom as kc

    x = np.random.rand(64, 8).astype("float32")
    y = np.random.randint(0, 2, 64)
    model = kc.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    model.compile(
        keras.optimizers.SGD(0.1),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        hooks=[kc.hooks.DifferentialPrivacy(
            l2_norm_clip=1.0, noise_multiplier=1.1, num_examples=64, delta=1e-3,
            accountant="rdp")],
    )
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    history.history["epsilon"]  # after each epoch
    ```

    References:
        Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang. Deep Learning
        with Differential Privacy. CCS 2016. https://arxiv.org/abs/1607.00133

        Bu, Wang, Zha, Karypis. Differentially Private Optimization on Large
        Model at Small Cost. ICML 2023. https://arxiv.org/abs/2210.00038

        Chua, Ghazi, Kamath, Kumar, Manurangsi, Sinha, Zhang. How Private are
        DP-SGD Implementations? ICML 2024. https://arxiv.org/abs/2403.17673
    """

    def __init__(
        self,
        l2_norm_clip,
        noise_multiplier,
        num_examples=None,
        delta=None,
        seed=None,
        expected_batch_size=None,
        target_epsilon=None,
        accountant="pld",
        method="fast",
        name="differential_privacy",
        start_step=0,
        stop_step=None,
    ):
        if start_step != 0 or stop_step is not None:
            raise ValueError(
                "DifferentialPrivacy: a step window would train some steps without "
                "privacy: it takes no `start_step` or `stop_step`. Received: "
                f"start_step={start_step!r}, stop_step={stop_step!r}"
            )
        super().__init__(name=name)
        self.l2_norm_clip = _positive(self, "l2_norm_clip", l2_norm_clip)
        self.noise_multiplier = _positive(
            self, "noise_multiplier", noise_multiplier, zero_ok=True
        )
        self.num_examples = _validation.optional_int(
            self, "num_examples", num_examples, 1
        )
        if delta is not None:
            delta = _positive(self, "delta", delta)
            if delta >= 1.0:
                raise ValueError(
                    "DifferentialPrivacy: `delta` must be in (0, 1). "
                    f"Received: delta={delta!r}"
                )
        self.delta = delta
        if (self.num_examples is None) != (delta is None):
            raise ValueError(
                "DifferentialPrivacy: give both `num_examples` and `delta` (to log "
                "epsilon), or neither. Received: "
                f"num_examples={num_examples!r}, delta={delta!r}"
            )
        self.seed = _validation.optional_int(self, "seed", seed, 0, _validation.INT32_MAX)
        self.expected_batch_size = _validation.optional_int(
            self, "expected_batch_size", expected_batch_size, 1
        )
        if (
            self.expected_batch_size is not None
            and self.num_examples is not None
            and self.expected_batch_size > self.num_examples
        ):
            raise ValueError(
                "DifferentialPrivacy: `expected_batch_size` must be at most "
                f"`num_examples` ({self.num_examples}). Received: "
                f"expected_batch_size={expected_batch_size!r}"
            )
        if target_epsilon is not None:
            target_epsilon = _positive(self, "target_epsilon", target_epsilon)
            if self.num_examples is None:
                raise ValueError(
                    "DifferentialPrivacy: `target_epsilon` needs `num_examples` and "
                    f"`delta`. Received: target_epsilon={target_epsilon!r}, "
                    "num_examples=None, delta=None"
                )
            if self.noise_multiplier == 0.0:
                raise ValueError(
                    "DifferentialPrivacy: no `target_epsilon` can be met without "
                    "noise. Received: noise_multiplier=0.0, "
                    f"target_epsilon={target_epsilon!r}"
                )
        self.target_epsilon = target_epsilon
        self.accountant = _validation.one_of(
            self, "accountant", accountant, accounting.ACCOUNTANTS
        )
        self.method = _validation.one_of(self, "method", method, METHODS)
        self.seed_generator = None
        self._epsilons = {}
        self._warned = set()
        self._plans = {}

    # ------------------------------------------------------------------- build
    def build(self, model):
        self._check_model(model)
        seed = self.seed if self.seed is not None else secrets.randbits(31)
        self.seed_generator = keras.random.SeedGenerator(
            seed, name=f"{self.name}_seed_generator"
        )
        state = self.seed_generator.state
        if self.seed is None:  # a secret counter too: 61 unknown bits in all
            start = np.array([seed, secrets.randbits(30)])
            state.assign(start.astype(keras.backend.standardize_dtype(state.dtype)))
        # State that never rolls back: a skipped update must not make the next
        # step reuse its noise, and every noisy step counts for the accounting.
        self._variables.append(state)
        self._kept_on_skip.add(id(state))
        self.steps = self.add_variable(
            dtype="int32", name=f"{self.name}_steps", rolls_back=False
        )
        self.largest_batch = self.add_variable(
            dtype="int32", name=f"{self.name}_largest_batch", rolls_back=False
        )

    def _check_model(self, model):
        label = self._label()
        hooks = model.hooks
        position = next(i for i, h in enumerate(hooks) if h is self)
        from keras_custom.step.pipeline import overrides

        before = [
            f"hooks[{i}] {type(h).__name__}(name={h.name!r})"
            for i, h in enumerate(hooks[:position])
            if overrides(h, "process_gradients")
        ]
        if before:
            raise ValueError(
                f"{label} must be the first hook that processes gradients: the "
                f"hooks before it ({', '.join(before)}) would see, log or change "
                "gradients that are not private yet. Move them after it. Received: "
                f"DifferentialPrivacy at hooks[{position}]"
            )
        for i, hook in enumerate(hooks):
            if hook is self or not overrides(hook, "loss_term"):
                continue
            if hook.loss_term_uses_data:
                raise ValueError(
                    f"{label}: hooks[{i}] {type(hook).__name__}(name={hook.name!r}) "
                    "adds a loss term that may read the batch: its gradient would "
                    "not be clipped per example. Only terms of the weights alone "
                    "(`loss_term_uses_data = False`, e.g. WeightPenalty) can be "
                    "combined with differential privacy."
                )
        if _keras.compiled_loss(model) is None:
            raise ValueError(
                f"{label}: the model must be compiled with a `loss` (an example's "
                "loss is the compiled loss on a batch of one). Received: loss=None"
            )
        for stage in _OURS:
            method = getattr(type(model), stage, None)
            module = getattr(method, "__module__", "") or ""
            if not module.startswith("keras_custom."):
                raise ValueError(
                    f"{label}: the model's class overrides `{stage}` "
                    f"({getattr(method, '__qualname__', stage)}), which would see "
                    "or compute gradients that are not private."
                )
        if model._kc_overridden_by_user("compute_loss"):
            raise ValueError(
                f"{label}: the model's class overrides `compute_loss`; the private "
                "gradient is built from the compiled loss of each example and "
                "cannot follow another objective."
            )
        outputs = getattr(model, "outputs", None)
        if outputs is not None and len(outputs) > 1:
            raise ValueError(
                f"{label}: models with several outputs are not supported yet. "
                f"Received: a model with {len(outputs)} outputs"
            )
        self._check_layers(model)
        layers = _keras.sublayers(model)
        low = sorted(
            {
                x.name
                for x in [model] + layers
                if getattr(x, "compute_dtype", "float32") != "float32"
                or getattr(x, "variable_dtype", "float32") != "float32"
            }
        )
        found = [f"layers {low} not in float32"] if low else []
        if loss_scale.is_scaled(getattr(model, "optimizer", None)):
            found.append("a LossScaleOptimizer")
        if found:
            raise ValueError(
                f"{label}: mixed precision and loss scaling are not supported: "
                "clipping and noise need float32. Use the 'float32' dtype policy. "
                f"Received: {', '.join(found)}"
            )
        if model.gradient_accumulation_steps is not None:
            raise ValueError(
                f"{label}: gradient accumulation is not supported yet (the noise "
                "must be added once per update, to the accumulated clipped sum): "
                "use a larger batch size. Received: gradient_accumulation_steps="
                f"{model.gradient_accumulation_steps}"
            )
        _check_not_distributed(label, model)
        plan = capture.Plan(model, fast=self.method == "fast")
        if plan.global_ids and plan.random_layers:
            names = [
                v.path for v in model.trainable_variables if id(v) in plan.global_ids
            ]
            raise ValueError(
                f"{label}: the variables {names} need per-example gradients of the "
                "whole model (vectorized over the batch: shared layers, layers with "
                "trainable sublayers, or method='vectorized'), and the layers "
                f"{[x.name for x in plan.random_layers]} draw random numbers: "
                "every example would get the same draws, not its own."
            )
        if self.num_examples is not None:
            taken = model._kc_reserved_names()
            owner = model._kc.logs.owners.get(LOG_NAME)
            if LOG_NAME in taken or (owner is not None and owner is not self):
                raise ValueError(
                    f"{label} logs {LOG_NAME!r}, which the model already logs (a "
                    f"compiled metric or another hook). Received: name={LOG_NAME!r}"
                )

    def _check_layers(self, model):
        """Refuses layers that mix examples or add loss terms from the batch (at
        build, and again when the trainable variables change)."""
        label = self._label()
        layers = _keras.sublayers(model)
        mixing = capture.trainable_batch_normalization(layers)
        if mixing:
            raise ValueError(
                f"{label}: BatchNormalization mixes the examples of a batch (its "
                "statistics), so an example's gradient is not its own. Use "
                "LayerNormalization or GroupNormalization, or freeze the layers "
                "(`trainable = False`: they then run in inference mode). Received: "
                f"trainable BatchNormalization layers {[x.name for x in mixing]}"
            )
        regularized = [
            x.name for x in layers if getattr(x, "activity_regularizer", None) is not None
        ]
        if regularized:
            raise ValueError(
                f"{label}: activity regularizers add a loss term computed from the "
                "batch, whose gradient would not be clipped per example. Received: "
                f"activity_regularizer on layers {regularized}"
            )

    # ----------------------------------------------------------------- the step
    def compute_gradients(self, model, x, y, sample_weight, variables):
        label = self._label()
        state = self.step_state
        if state.in_gradient_stages:
            raise RuntimeError(
                f"{label}: a hook asked for a second gradient pass "
                "(`model.gradients_at_current_weights`, e.g. SharpnessAware), whose "
                "gradient would not be private. Remove that hook."
            )
        if not self.built:
            raise RuntimeError(
                f"{label}: build the model before training (give it an `Input`, or "
                "call `model.build(input_shape)`): the per-example rules are chosen "
                "from its layers."
            )
        _check_not_distributed(label, model)
        if variables is None:
            variables = model.trainable_variables
        result = clipping.clipped_gradient_sum(
            model,
            x,
            y,
            sample_weight,
            self.l2_norm_clip,
            list(variables),
            fast=self.method == "fast",
            owner=label,
            plan=self._plan(model),
        )
        divisor = self._divisor(model, x)
        grads = [ops.divide(s, divisor) for s in result.sums]

        def loss(tap):
            value = model.compute_loss(
                x=x, y=y, y_pred=result.y_pred, sample_weight=sample_weight, training=True
            )
            return value, None

        if _has_weight_terms(model, variables):
            # The predictions are constants here: only the terms of the weights
            # alone (regularizers, WeightPenalty) have a gradient.
            value, _, terms, _ = model._kc_grad_wrt(loss, variables)
            grads = [ops.add(g, ops.cast(t, g.dtype)) for g, t in zip(grads, terms)]
        else:
            value, _ = loss(None)
        return result.y_pred, value, grads

    def process_gradients(self, grads, variables, step):
        state = self.step_state
        if state.gradient_hook is not self:
            raise RuntimeError(
                f"{self._label()}: this step's gradients were not computed by the "
                "hook (`model.apply_hooks(grads)` takes gradients from outside the "
                "step), so they are not clipped per example. Train with `fit` or "
                "`train_on_batch`."
            )
        x = state.batch[0]
        model = state.model
        if self.noise_multiplier > 0.0:
            stddev = ops.divide(
                self.noise_multiplier * self.l2_norm_clip, self._divisor(model, x)
            )
            grads = add_gradient_noise(grads, stddev, self.seed_generator)
        self.steps.assign(ops.add(self.steps.value, 1))
        size = ops.cast(model._kc_batch_size(x), "int32")
        self.largest_batch.assign(ops.maximum(self.largest_batch.value, size))
        return grads

    def _plan(self, model):
        """The model's `capture.Plan`, made again when its trainable variables
        change (a step on PyTorch is eager: this saves the walk through the
        layers at every step)."""
        key = tuple(id(v) for v in model.trainable_variables)
        if self._plans.get("key") != key:
            self._check_layers(model)
            self._plans = {
                "key": key,
                "plan": capture.Plan(model, fast=self.method == "fast"),
            }
        return self._plans["plan"]

    def _divisor(self, model, x):
        if self.expected_batch_size is not None:
            return ops.convert_to_tensor(float(self.expected_batch_size), "float32")
        return ops.cast(model._kc_batch_size(x), "float32")

    # --------------------------------------------------------------- accounting
    def sample_rate(self):
        """The accounting's sample rate: `expected_batch_size / num_examples`, or
        (largest batch seen) / `num_examples`; `None` before the first step."""
        self._need_accounting("sample_rate()")
        if self.expected_batch_size is not None:
            return self.expected_batch_size / self.num_examples
        largest = self._read(self.largest_batch) if self.built else 0
        if largest == 0:
            return None
        if largest > self.num_examples:
            raise ValueError(
                f"{self._label()}: a batch of {largest} examples was seen, more "
                "than `num_examples`: `num_examples` must be the number of "
                "training examples. Received: "
                f"num_examples={self.num_examples}"
            )
        return largest / self.num_examples

    def epsilon(self, steps=None):
        """The epsilon spent after `steps` steps (default: the steps taken).

        Computed in Python (about a second with the PLD accountant); see the
        class docstring for what it assumes.
        """
        self._need_accounting("epsilon()")
        if steps is None:
            steps = self._read(self.steps) if self.built else 0
        return self._epsilon(steps, self.sample_rate())

    def _epsilon(self, steps, sample_rate):
        if steps == 0 or sample_rate is None:
            return 0.0
        if self.expected_batch_size is None and "sampling" not in self._warned:
            self._warned.add("sampling")
            warnings.warn(
                f"{self._label()}: epsilon is computed as if each batch were "
                f"Poisson-sampled with rate {sample_rate:.4g} (the largest batch "
                "seen / num_examples). fit's shuffled fixed-size batches are not, "
                "and their true epsilon can be larger. For the guarantee, feed "
                "keras_custom.privacy.poisson_batches(...) and pass the same "
                "expected_batch_size to the hook.",
                stacklevel=3,
            )
        key = (int(steps), float(sample_rate))
        if key not in self._epsilons:
            self._epsilons[key] = accounting.epsilon(
                self.noise_multiplier,
                sample_rate,
                int(steps),
                self.delta,
                accountant=self.accountant,
            )
        return self._epsilons[key]

    def _read(self, variable):
        owner = self._owner()
        if owner is not None:
            owner._kc_sync_state()
        return int(ops.convert_to_numpy(variable))

    def _need_accounting(self, what):
        if self.num_examples is None:
            raise ValueError(
                f"{self._label()}: {what} needs `num_examples` and `delta`. "
                "Received: num_examples=None, delta=None"
            )

    def callbacks(self):
        if self.num_examples is None:
            return []
        if getattr(self, "_budget_callback", None) is None:
            self._budget_callback = _PrivacyBudget(self)
        return [self._budget_callback]

    def _steps_per_epoch(self, params, why):
        steps = (params or {}).get("steps")
        if steps is None:
            raise ValueError(
                f"{self._label()}: {why} needs the number of steps per epoch, which "
                "this fit does not know: pass `steps_per_epoch` to fit. Received: "
                f"target_epsilon={self.target_epsilon!r}"
            )
        return int(steps)

    def _budget_before(self, params):
        """At the start of `fit`: refuses to start if the first epoch would
        exceed `target_epsilon`."""
        if self.target_epsilon is None:
            return
        per_epoch = self._steps_per_epoch(params, "target_epsilon")
        done = self._read(self.steps) if self.built else 0
        rate = self.sample_rate()
        if rate is None:
            # No batch seen yet: the largest batch of an epoch of `per_epoch`
            # steps over num_examples examples is at most this.
            n = self.num_examples
            largest = n if per_epoch == 1 else -(-n // (per_epoch - 1))
            rate = min(1.0, largest / n)
        after = self._epsilon(done + per_epoch, rate)
        if after > self.target_epsilon:
            spent = self._epsilon(done, rate)
            raise ValueError(
                f"{self._label()}: the next epoch ({per_epoch} steps) would spend "
                f"epsilon={after:.4g}, beyond target_epsilon={self.target_epsilon!r} "
                f"(spent so far: {spent:.4g} after {done} steps). Training did not "
                "start."
            )

    def _budget_after(self, params):
        """At the end of an epoch: whether the next epoch would exceed the budget."""
        if self.target_epsilon is None:
            return False
        per_epoch = self._steps_per_epoch(params, "target_epsilon")
        done = self._read(self.steps)
        after = self._epsilon(done + per_epoch, self.sample_rate())
        if after <= self.target_epsilon:
            return False
        warnings.warn(
            f"{self._label()}: training stops: the next epoch would spend "
            f"epsilon={after:.4g}, beyond target_epsilon={self.target_epsilon!r} "
            f"(spent: {self.epsilon():.4g} after {done} steps).",
            stacklevel=2,
        )
        return True

    def check_state(self, values):
        steps, largest = (int(v) for v in values[1:3])
        if steps < 0 or largest < 0:
            raise ValueError(
                f"{self._label()}: the file's saved counters must be >= 0. "
                f"Received: steps={steps}, largest_batch={largest}"
            )
        if self.num_examples is not None and largest > self.num_examples:
            raise ValueError(
                f"{self._label()}: the file's largest batch ({largest}) exceeds "
                f"num_examples={self.num_examples}."
            )

    def get_config(self):
        config = super().get_config()
        config.update(
            l2_norm_clip=self.l2_norm_clip,
            noise_multiplier=self.noise_multiplier,
            num_examples=self.num_examples,
            delta=self.delta,
            seed=self.seed,
            expected_batch_size=self.expected_batch_size,
            target_epsilon=self.target_epsilon,
            accountant=self.accountant,
            method=self.method,
        )
        return config

    def _label(self):
        return f"DifferentialPrivacy(name={self.name!r})"


class _PrivacyBudget(keras.callbacks.Callback):
    """Logs `epsilon` at each epoch's end and keeps `fit` within `target_epsilon`
    (placed before the user's callbacks: `Hook.callbacks`)."""

    def __init__(self, hook):
        super().__init__()
        self.hook = hook

    def on_train_begin(self, logs=None):
        self.hook._budget_before(self.params)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs[LOG_NAME] = self.hook.epsilon()
        if self.hook._budget_after(self.params):
            self.model.stop_training = True


def _positive(hook, name, value, zero_ok=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{type(hook).__name__}: `{name}` must be a float. Received: "
            f"{name}={value!r} of type {type(value).__name__}"
        )
    return _validation.strength(hook, name, value, 0.0, inclusive=zero_ok)


def _has_weight_terms(model, variables):
    """Whether the loss has terms of the weights alone (regularizers, hooks)."""
    if model._kc is not None and model._kc.stage_hooks["loss_term"]:
        return True
    return any(getattr(v, "regularizer", None) is not None for v in variables)


def _check_not_distributed(label, model):
    if keras.distribution.distribution() is not None:
        raise ValueError(
            f"{label}: `keras.distribution` is not supported yet (the noise must be "
            "added once, to the sum over all devices). Received: "
            f"{keras.distribution.distribution()!r}"
        )
    strategy = getattr(model, "distribute_strategy", None)
    replicas = getattr(strategy, "num_replicas_in_sync", 1)
    if replicas > 1 or model._kc_replica_share() is not None:
        raise ValueError(
            f"{label}: tf.distribute strategies with several replicas are not "
            "supported yet (the noise must be added once, to the sum over "
            f"replicas). Received: {replicas} replicas"
        )
