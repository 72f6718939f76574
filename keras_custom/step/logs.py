"""The hooks' logs: one Keras metric tracker per name, and the rules for names.

A hook reports a scalar with `Hook.log(name, value)`. Each name gets a
`keras.metrics.Mean` (or `Sum`, for counts) that the model lists in `model.metrics`,
so Keras shows its epoch value in the progress bar, `History`, `CSVLogger` and
`TensorBoard`, and resets it each epoch.

Names are checked so that a log can never be misread: a hook's log may not be called
`loss`, take the name of a compiled metric, start with `val_` (Keras's prefix for
validation logs), or take a name another hook logs. Two hooks logging one name would
silently merge into one mean, so that is an error too; give one of them another
`name=`.
"""

import keras
from keras import ops

REDUCTIONS = ("mean", "sum")


def check_reduction(owner, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"{owner}: `reduction` must be 'mean' or 'sum'. "
            f"Received: reduction={reduction!r}"
        )


def check_name(owner, name):
    """A log name is a non-empty string."""
    if not isinstance(name, str) or not name:
        raise TypeError(
            f"{owner}: a log name must be a non-empty string. Received: name={name!r}"
            f" of type {type(name).__name__}"
        )


def describe(hook, index=None):
    where = "" if index is None else f"hooks[{index}] "
    return f"{where}{type(hook).__name__}(name={hook.name!r})"


class LogBook:
    """The trackers of a model's hook logs, by name (insertion order).

    `owners` maps each name to the hook (or the model, for `model.log_value`) that
    logs it; `test_names` are the names the test step logs (an evaluation reports
    only those).
    """

    def __init__(self, build_scope):
        self._build_scope = build_scope
        self.trackers = {}
        self.owners = {}
        self.reductions = {}
        self.test_names = set()

    def claim(self, owner, name, reduction, reserved=()):
        """Registers `owner` as the one that logs `name`; checks the rules."""
        label = owner_label(owner)
        check_name(label, name)
        check_reduction(label, reduction)
        holder = self.owners.get(name)
        if holder is not None and holder is not owner:
            raise ValueError(
                f"{label} logs {name!r}, which {owner_label(holder)} logs too: the "
                "two would merge into one epoch value. Give one of them another "
                f"`name=`. Received: name={name!r}"
            )
        check_reserved(label, name, reserved)
        if holder is None:
            self.owners[name] = owner
            self.reductions[name] = reduction
        elif self.reductions[name] != reduction:
            raise ValueError(
                f"{label} logs {name!r} with reduction={reduction!r}, but it was first "
                f"logged with reduction={self.reductions[name]!r}."
            )

    def tracker(self, name):
        """The tracker of `name`, created (eagerly, outside any trace) if needed."""
        tracker = self.trackers.get(name)
        if tracker is None:
            with self._build_scope():
                if self.reductions[name] == "sum":
                    tracker = _Sum(name=name)
                else:
                    tracker = keras.metrics.Mean(name=name)
            self.trackers[name] = tracker
        return tracker

    def update(self, name, value, weight=None):
        tracker = self.trackers.get(name) or self.tracker(name)
        dtype = getattr(value, "dtype", None)
        if dtype is None or keras.backend.standardize_dtype(dtype) != "float32":
            value = ops.cast(value, "float32")
        if weight is None:
            tracker.update_state(value)
        else:
            tracker.update_state(value, sample_weight=weight)


class _Sum(keras.metrics.Sum):
    """`keras.metrics.Sum` whose result is a copy: on PyTorch the plain result is
    the variable's own tensor, which the reset before validation zeroes in the
    epoch's logs."""

    def result(self):
        return ops.copy(super().result())


def owner_label(owner):
    from keras_custom.hook import Hook

    if isinstance(owner, Hook):
        return describe(owner)
    return f"model {getattr(owner, 'name', owner)!r} (log_value)"


def check_reserved(label, name, reserved):
    if name == "loss":
        raise ValueError(
            f"{label}: a hook's log cannot be called 'loss': it would replace the "
            "model's loss in the logs, and callbacks that monitor 'loss' "
            "(EarlyStopping, ModelCheckpoint) would watch it. Received: name='loss'"
        )
    if name.startswith("val_"):
        raise ValueError(
            f"{label}: a hook's log cannot start with 'val_': Keras names the "
            f"validation logs so. Received: name={name!r}"
        )
    if name in reserved:
        raise ValueError(
            f"{label}: the log name {name!r} is the name of a compiled metric of the "
            f"model; the hook's value would replace it in the logs. Give the hook "
            f"another `name=`. Received: name={name!r}"
        )
