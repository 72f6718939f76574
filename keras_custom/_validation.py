"""Argument checks shared by the hooks: each error names the hook and the argument
and echoes the value it received."""

import numbers
import re

import keras
import numpy as np

_SCHEDULE = keras.optimizers.schedules.LearningRateSchedule

INT64_MAX = int(np.iinfo(np.int64).max)
INT32_MAX = int(np.iinfo(np.int32).max)
UINT32_MAX = int(np.iinfo(np.uint32).max)
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _owner(hook):
    return hook if isinstance(hook, str) else type(hook).__name__


def strength(hook, name, value, minimum=0.0, inclusive=False):
    """A float >= / > `minimum`, or a `LearningRateSchedule` (returned as is)."""
    if isinstance(value, _SCHEDULE):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{_owner(hook)}: `{name}` must be a float or a "
            f"keras.optimizers.schedules.LearningRateSchedule. "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    value = float(value)
    ok = value >= minimum if inclusive else value > minimum
    if not ok or value != value or value == float("inf"):
        bound = ">=" if inclusive else ">"
        raise ValueError(
            f"{_owner(hook)}: `{name}` must be a finite float {bound} {minimum:g}. "
            f"Received: {name}={value!r}"
        )
    if abs(value) > FLOAT32_MAX:
        raise ValueError(
            f"{_owner(hook)}: `{name}` must fit in float32 (at most {FLOAT32_MAX:.6g}): "
            f"the step computes in float32, where it would be inf. "
            f"Received: {name}={value!r}"
        )
    return value


def step(hook, name, value):
    """A non-negative integer step that an int64 step counter can reach."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(
            f"{_owner(hook)}: `{name}` must be an integer >= 0. "
            f"Received: {name}={value!r}"
        )
    if value > INT64_MAX:
        raise ValueError(
            f"{_owner(hook)}: `{name}` must be at most {INT64_MAX} (2**63 - 1), the "
            f"largest step an int64 counter reaches. Received: {name}={value!r}"
        )
    return int(value)


def optional_int(hook, name, value, minimum, maximum=INT64_MAX):
    """`None` or an integer from `minimum` to `maximum` (returned as `int`)."""
    if value is None:
        return None
    return integer(hook, name, value, minimum, maximum, _none_ok=True)


def name(hook, value):
    """A hook's `name`: a non-empty string."""
    if not isinstance(value, str) or not value:
        raise TypeError(
            f"{_owner(hook)}: `name` must be a non-empty string. "
            f"Received: name={value!r} of type {type(value).__name__}"
        )
    return value


def patterns(hook, name, value):
    """`None`, a regular expression, or a list of them -> tuple of strings."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    try:
        items = list(items)
    except TypeError:
        items = [items]
    if not items:
        raise ValueError(
            f"{_owner(hook)}: `{name}` must be a regular expression or a non-empty "
            f"list of them. Received: {name}={value!r}"
        )
    for item in items:
        if not isinstance(item, str):
            raise TypeError(
                f"{_owner(hook)}: `{name}` must contain strings (regular expressions "
                f"searched in `variable.path`). Received: {name}={value!r}"
            )
        try:
            re.compile(item)
        except re.error as e:
            raise ValueError(
                f"{_owner(hook)}: `{name}` has an invalid regular expression "
                f"{item!r} ({e}). Received: {name}={value!r}"
            ) from None
    return tuple(items)


def one_of(hook, name, value, choices):
    if value not in choices:
        raise ValueError(
            f"{_owner(hook)}: `{name}` must be one of {sorted(choices)}. "
            f"Received: {name}={value!r}"
        )
    return value


def boolean(hook, name, value):
    """A bool (not an int or a string that reads as one)."""
    if not isinstance(value, bool):
        raise TypeError(
            f"{_owner(hook)}: `{name}` must be a bool. Received: {name}={value!r}"
        )
    return value


def integer(hook, name, value, minimum, maximum=INT64_MAX, _none_ok=False):
    """An integer from `minimum` to `maximum` (returned as `int`). `hook` is the
    hook, or the name of what checks (used in the message)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < minimum
    ):
        what = "None or an integer" if _none_ok else "an integer"
        raise ValueError(
            f"{_owner(hook)}: `{name}` must be {what} >= {minimum}. "
            f"Received: {name}={value!r}"
        )
    if value > maximum:
        raise ValueError(
            f"{_owner(hook)}: `{name}` must be at most {maximum}. "
            f"Received: {name}={value!r}"
        )
    return int(value)


def interval(hook, name, value, low, high, low_open=False, high_open=False):
    """A float in the interval from `low` to `high` (each end open or closed)."""
    text = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{_owner(hook)}: `{name}` must be a float in {text}. "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    value = float(value)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):  # NaN fails both
        raise ValueError(
            f"{_owner(hook)}: `{name}` must be a float in {text}. "
            f"Received: {name}={value!r}"
        )
    return value
