"""Choosing variables by regular expressions searched in `variable.path`."""

import re

# The last path component of the weights a penalty acts on by default: kernels of
# Dense, Conv, RNN and attention layers, and embedding tables. Biases and the
# scale/offset of normalization layers are left alone.
_PENALIZED_NAMES = re.compile(r"(^|_)kernel$|^embeddings$")


def is_kernel_like(variable):
    """Whether `variable` is a kernel or an embedding table (by its name)."""
    return bool(_PENALIZED_NAMES.search(variable.path.rsplit("/", 1)[-1]))


def select(hook, variables, include=None, exclude=None, default=None):
    """The variables `hook` acts on, in model order.

    `include` (patterns, searched anywhere in `variable.path`) replaces the default
    selection; `exclude` narrows it. Every pattern must match at least one of
    `variables`, or a `ValueError` names the hook, the argument and the paths there
    are.
    """
    owner = type(hook).__name__
    variables = list(variables)
    paths = [v.path for v in variables]

    def matching(name, pattern):
        found = [v for v, p in zip(variables, paths) if re.search(pattern, p)]
        if not found:
            raise ValueError(
                f"{owner}: the `{name}` pattern {pattern!r} matches no variable of the "
                f"model. Received: {name}={pattern!r}. Variable paths: {_listing(paths)}"
            )
        return found

    if include is None:
        chosen = [v for v in variables if default is None or default(v)]
    else:
        ids = set()
        for pattern in include:
            ids.update(id(v) for v in matching("include", pattern))
        chosen = [v for v in variables if id(v) in ids]
    if exclude is not None:
        dropped = set()
        for pattern in exclude:
            dropped.update(id(v) for v in matching("exclude", pattern))
        chosen = [v for v in chosen if id(v) not in dropped]
    return chosen


def _listing(paths, most=12):
    if not paths:
        return "(none: the model has no trainable variables)"
    shown = ", ".join(paths[:most])
    return shown + (f", ... ({len(paths) - most} more)" if len(paths) > most else "")
