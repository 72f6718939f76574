"""`StepState`: what one traced train or test step knows, in one object.

Every train step, test step and `apply_hooks` call opens one `StepState` and makes it
current for its thread while it runs (`with StepState(...) as state:`). The stages
read and write it; hooks see it as `self.step_state`. Nothing about a step is stored
on the model: the model keeps only what outlives a step (the hooks, the log trackers,
the gradient accumulator; see `keras_custom/step/pipeline.py`).

Why per thread: `tf.distribute.MirroredStrategy` traces each replica's step in a
thread of its own, and the threads take turns at every cross-replica point. A
backend that runs part of a step in another thread re-enters the state there
(`with state:`).
"""

import threading

from keras import ops

_local = threading.local()


def _stack():
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


class StepState:
    """The state of one train step, test step or `apply_hooks` call.

    Attributes:
        model: the model whose step this is.
        training: `True` in a train step and in `apply_hooks`, `False` in a test step.
        batch: `(x, y, sample_weight)` of the step, or `None` in `apply_hooks`.
        step: the optimizer's step before this update (an integer tensor), set when
            the gradient stages begin.
        loss: the step's loss, summed over replicas and unscaled (the mean of the
            accumulated losses with gradient accumulation), during the gradient
            stages; `None` in `apply_hooks`.
        loss_scale_finite: under loss scaling, a boolean tensor: whether the
            scaled gradients were finite; `None` without loss scaling.
        objective: what `model.gradients_at_current_weights(objective=...)` asks
            for during a second pass; `None` in the step's own pass.
        gradient_hook: the hook whose `compute_gradients` computed this step's
            gradients, or `None` where the model took them itself (and in
            `apply_hooks`, whose gradients come from the caller).
        scope: on JAX, the `keras.StatelessScope` holding the step's state.
        symbolic: `True` while Keras builds the model, its metrics and loss
            symbolically (before the first step): hooks take no part then.
    """

    def __init__(self, model, training, batch=None, scope=None, symbolic=False):
        self.model = model
        self.training = training
        self.batch = batch
        self.step = None
        self.loss = None
        self.loss_scale_finite = None
        self.objective = None
        self.gradient_hook = None
        self.log_weight = None  # a hook's window (0/1) times a replica share
        self.active = None  # while a hook with a window runs: whether it is active
        self.muted = False
        self.skips = None  # a list while the gradient stages run
        self.snapshot = ()  # (variable, value before the step) pairs to roll back
        self.scope = scope  # JAX: the `keras.StatelessScope` the step runs in
        self.symbolic = symbolic  # Keras builds the model symbolically: no hooks
        self._memo = {}
        self._scratch = {}

    # ----------------------------------------------------------- current state
    @staticmethod
    def current():
        """The innermost active `StepState` of this thread, or `None`."""
        stack = _stack()
        return stack[-1] if stack else None

    def __enter__(self):
        _stack().append(self)
        return self

    def __exit__(self, *exc):
        stack = _stack()
        if stack and stack[-1] is self:
            stack.pop()
        else:  # left out of order (an exception inside a nested scope)
            for i in range(len(stack) - 1, -1, -1):
                if stack[i] is self:
                    del stack[i]
                    break
        return False

    # --------------------------------------------------------- scoped changes
    def scoped(self, **changes):
        """A context that sets attributes of this state and restores them after."""
        return _Scoped(self, changes)

    # -------------------------------------------------------------- updating
    @property
    def in_gradient_stages(self):
        """Whether the gradient stages (process, update, after-update) run now."""
        return self.skips is not None

    def request_skip(self, condition):
        """Records a hook's request to skip this step's update where `condition`."""
        self.skips.append(condition)

    def should_apply(self):
        """`None` if the update always applies, else a boolean tensor: whether the
        update of this step is applied (finite under loss scaling, no skip)."""
        skip = None
        for condition in self.skips or ():
            skip = condition if skip is None else ops.logical_or(skip, condition)
        go = None if skip is None else ops.logical_not(skip)
        finite = self.loss_scale_finite
        if finite is not None:
            go = finite if go is None else ops.logical_and(finite, go)
        return go

    def skip_requested(self):
        """`None` if no hook asked to skip, else a boolean tensor: whether one did."""
        skip = None
        for condition in self.skips or ():
            skip = condition if skip is None else ops.logical_or(skip, condition)
        return skip

    # -------------------------------------------------- per-hook scratch space
    def scratch(self, hook):
        """A dict that `hook` may use to keep values between its stages of this
        step (weights before the update, say).

        A hook object is shared by the replicas of a `tf.distribute` strategy,
        whose threads run the stages in turns: a value kept on the hook itself
        would be another replica's. Each replica has its own `StepState`.
        """
        return self._scratch.setdefault(id(hook), {})

    # ------------------------------------------------------------ memoization
    def memo(self, key, tensors, compute):
        """`compute()`, computed once per step for the same `key` and `tensors`.

        `tensors` identify the input (by object identity, kept alive here): two
        hooks that ask for, say, the global norm of the same gradients get one
        computation. In a compiled step this only saves tracing work; on the eager
        PyTorch backend it saves the computation itself.
        """
        ident = (key, tuple(id(t) for t in tensors))
        hit = self._memo.get(ident)
        if hit is not None:
            return hit[1]
        value = compute()
        self._memo[ident] = (list(tensors), value)
        return value


class _Scoped:
    def __init__(self, state, changes):
        self.state = state
        self.changes = changes
        self.previous = None

    def __enter__(self):
        self.previous = {k: getattr(self.state, k) for k in self.changes}
        for key, value in self.changes.items():
            setattr(self.state, key, value)
        return self.state

    def __exit__(self, *exc):
        for key, value in self.previous.items():
            setattr(self.state, key, value)
        return False


def current():
    """The active `StepState` of this thread, or `None` outside any step."""
    return StepState.current()
