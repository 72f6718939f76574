"""Regularization hooks: loss terms on the weights."""

import keras
from keras import ops

from keras_custom import _selection
from keras_custom import _validation
from keras_custom.hook import Hook
from keras_custom.hook import Strength
from keras_custom.hooks.clipping import sum_of_squares


def weight_penalty(weights, l1=0.0, l2=0.0):
    """`l1 * sum|w| + l2 * sum w**2` over `weights` (Keras's regularizer convention).

    A strength that is the Python number 0 leaves its term out (nothing is
    computed for it); a tensor strength is always computed, even when it holds 0.

    Args:
        weights: a list of tensors.
        l1: the L1 strength (float or scalar tensor).
        l2: the L2 strength (float or scalar tensor).

    Returns:
        A float32 scalar.

    Example:

    >>> float(weight_penalty([keras.ops.array([1.0, -2.0])], l1=0.5, l2=0.1))
    2.0
    """
    terms = []
    for strength, fn in ((l1, _sum_of_abs), (l2, sum_of_squares)):
        if isinstance(strength, (int, float)) and strength == 0:
            continue
        total = None
        for w in weights:
            part = fn(w)
            total = part if total is None else total + part
        if total is not None:
            terms.append(ops.cast(strength, "float32") * total)
    if not terms:
        return ops.convert_to_tensor(0.0, "float32")
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _sum_of_abs(x):
    if keras.backend.standardize_dtype(x.dtype) != "float32":
        x = ops.cast(x, "float32")
    return ops.sum(ops.abs(x))


@keras.saving.register_keras_serializable(package="keras_custom")
class WeightPenalty(Hook):
    """Adds `l1 * sum|w| + l2 * sum w**2` to the loss and logs it as `weight_penalty`.

    By default it acts on kernels and embedding tables, not on biases or the
    scale/offset of normalization layers. The term is part of `loss` and of
    `val_loss`, as Keras's own `kernel_regularizer` would be.

    A strength given as `0.0` (the default) adds no work to the step: its term is
    left out when the hook is built, and `WeightPenalty()` alone is a valid no-op
    (it logs 0). A non-zero float can be changed later (`hook.l2 = 1e-3`, from a
    callback) without tracing the step again; raising a strength that was 0 when
    the hook was built makes the model trace its step again, once, with the term.

    Args:
        l1: L1 strength, a float >= 0 or a `LearningRateSchedule`.
        l2: L2 strength, a float >= 0 or a `LearningRateSchedule`.
        include: regular expression(s) searched in `variable.path`; replaces the
            default selection.
        exclude: regular expression(s); removes matching variables.
        name: the log name (default `"weight_penalty"`).
        **kwargs: `start_step`, `stop_step` (see `Hook`).

    Example:

    >>> hook = WeightPenalty(l2=1e-4, exclude="output")
    >>> hook.l2
    0.0001
    """

    # A term of the weights alone: `DifferentialPrivacy` adds its gradient whole.
    loss_term_uses_data = False

    l1 = Strength(minimum=0.0, inclusive=True, zero_drops="L1 term")
    l2 = Strength(minimum=0.0, inclusive=True, zero_drops="L2 term")

    def __init__(
        self, l1=0.0, l2=0.0, include=None, exclude=None, name="weight_penalty", **kwargs
    ):
        super().__init__(name=_validation.name(self, name), **kwargs)
        self.l1 = l1
        self.l2 = l2
        self.include = _validation.patterns(self, "include", include)
        self.exclude = _validation.patterns(self, "exclude", exclude)
        self._weights = []
        self.declare_log(self.name)

    def build(self, model):
        self._weights = _selection.select(
            self,
            model.trainable_variables,
            self.include,
            self.exclude,
            default=_selection.is_kernel_like,
        )
        if not self._weights:
            raise ValueError(
                "WeightPenalty: no variable to penalize (the model has no kernel or "
                "embedding among its trainable variables, or `exclude` removed them "
                f"all). Received: include={self.include!r}, exclude={self.exclude!r}"
            )

    def loss_term(self, model, x, y, y_pred, sample_weight, training):
        l1, l2 = (0.0 if self.is_zero(n) else self.strength(n) for n in ("l1", "l2"))
        penalty = weight_penalty(self._weights, l1, l2)
        self.log(self.name, penalty)
        return penalty

    @property
    def weights(self):
        """The variables the penalty acts on (after `build`)."""
        return list(self._weights)

    def get_config(self):
        config = super().get_config()
        config.update(include=_listify(self.include), exclude=_listify(self.exclude))
        return config


def _listify(patterns):
    return None if patterns is None else list(patterns)
