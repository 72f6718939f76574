"""`Pipeline`: what a hooked model keeps between steps, in one object.

A model with hooks holds exactly one `Pipeline` (as `model._kc`): the hooks in list
order, which of them take part in each stage, the log trackers, the gradient
accumulator and what the abstract first pass found out (the log names, whether a
hook may skip an update). `compile` makes a new one; a failed `compile` keeps the
old one.
"""

from keras_custom.hook import Hook
from keras_custom.step.logs import LogBook
from keras_custom.step.logs import describe

STAGES = ("loss_term", "compute_gradients", "process_gradients", "after_update", "check")


def overrides(hook, stage):
    """Whether `hook`'s class overrides `stage` (a stage it does not is never run)."""
    return getattr(type(hook), stage) is not getattr(Hook, stage)


def validate_hooks(hooks, where="compile"):
    """`hooks` as a tuple of `Hook` instances, in order, each once (`where` names
    the call, for the error messages)."""
    if hooks is None:
        return ()
    if isinstance(hooks, Hook):
        return (hooks,)
    if isinstance(hooks, type) and issubclass(hooks, Hook):
        raise TypeError(
            f"{where}: `hooks` must be a list of keras_custom.Hook instances. "
            f"Received: hooks={hooks.__name__} (a class); write "
            f"hooks=[{hooks.__name__}(...)]"
        )
    if isinstance(hooks, (set, frozenset, dict)):
        raise TypeError(
            f"{where}: `hooks` must be a list (or tuple) of keras_custom.Hook "
            f"instances: hooks run in list order, and a {type(hooks).__name__} has "
            f"no order. Received: hooks={hooks!r}"
        )
    if isinstance(hooks, str) or not hasattr(hooks, "__iter__"):
        raise TypeError(
            f"{where}: `hooks` must be a list of keras_custom.Hook instances. "
            f"Received: hooks={hooks!r}"
        )
    hooks = list(hooks)
    seen = {}
    for i, hook in enumerate(hooks):
        if isinstance(hook, type) and issubclass(hook, Hook):
            raise TypeError(
                f"{where}: `hooks[{i}]` is the class {hook.__name__}, not an instance. "
                f"Write {hook.__name__}(...). Received: hooks[{i}]={hook!r}"
            )
        if not isinstance(hook, Hook):
            raise TypeError(
                f"{where}: `hooks[{i}]` must be a keras_custom.Hook instance. "
                f"Received: hooks[{i}]={hook!r} of type {type(hook).__name__}"
            )
        if id(hook) in seen:
            raise ValueError(
                f"{where}: `hooks[{i}]` ({describe(hook)}) is the same object as "
                f"`hooks[{seen[id(hook)]}]`; pass separate instances."
            )
        seen[id(hook)] = i
    return tuple(hooks)


class Pipeline:
    """The hooks of one model and what they share between steps."""

    def __init__(self, hooks, accumulator, build_scope):
        self.hooks = tuple(hooks)
        self.accumulator = accumulator
        self.logs = LogBook(build_scope)
        self.stage_hooks = {
            stage: tuple(h for h in self.hooks if overrides(h, stage)) for stage in STAGES
        }
        self.gradient_hook = _gradient_hook(self.hooks, self.stage_hooks)
        self.evaluating = False
        self.compiled_names = set()  # the compiled metrics' names, from compile
        self.names_checked = False  # checked against the built metrics' names
        self.built = False  # every hook built and its trackers made
        # Whether a hook ever asked to skip an update: None until the first
        # train step ran (a step keeps what a skip would restore until then).
        self.may_skip = None

    @property
    def all_hooks(self):
        """The hooks, then the model's own state holders (the accumulator)."""
        extra = () if self.accumulator is None else (self.accumulator,)
        return self.hooks + extra

    def state_variables(self):
        """Every hook's (and the accumulator's) variables, in order, each once."""
        seen = set()
        out = []
        for hook in self.all_hooks:
            for variable in hook.variables:
                if id(variable) not in seen:
                    seen.add(id(variable))
                    out.append(variable)
        return out

    def rollback_variables(self):
        """The hook variables a skipped update restores (see `Hook.add_variable`)."""
        out = []
        for hook in self.hooks:
            out.extend(v for v in hook.variables if id(v) not in hook._kept_on_skip)
        return out


def _gradient_hook(hooks, stage_hooks):
    """The one hook that takes over the gradients (`compute_gradients`), or None."""
    takers = stage_hooks["compute_gradients"]
    index = {id(h): i for i, h in enumerate(hooks)}
    if len(takers) > 1:
        first, second = takers[:2]
        raise ValueError(
            f"compile: {describe(first, index[id(first)])} and "
            f"{describe(second, index[id(second)])} both compute the gradients "
            "(`compute_gradients`); at most one hook per model may. "
            f"Received: hooks={list(hooks)!r}"
        )
    if not takers:
        return None
    hook = takers[0]
    if hook.has_window:
        raise ValueError(
            f"compile: {describe(hook, index[id(hook)])} computes the gradients "
            "(`compute_gradients`), which cannot be switched on and off by a step "
            "window. Received: "
            f"start_step={hook.start_step}, stop_step={hook.stop_step}"
        )
    return hook
