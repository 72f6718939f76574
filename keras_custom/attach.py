"""`attach`: hooks on a Keras model that was not built from `kc.Model`.

`kc.attach(model, hooks)` gives any `keras.Model` instance (Functional, Sequential,
a subclass of the user's, a KerasHub task, a `keras.applications` network) the
hooked step. The instance's class is replaced by a subclass of it that puts the
backend's `Trainer` first (one subclass per class, made once): `isinstance` with
the model's own class still holds, `model.__class__` still reads that class, and
`.keras` files name it, so they load without keras_custom (see
`keras_custom/step/saving.py`).
"""

import keras

from keras_custom.backend import Trainer
from keras_custom.step import accumulation
from keras_custom.step.pipeline import validate_hooks

_KerasModel = keras.Model  # kept at import (see `keras_custom/models.py`)
_HOOKED = {}


def attach(model, hooks):
    """Gives an existing Keras model the hooked train and test steps.

    Args:
        model: a `keras.Model` instance of any class (built or not, compiled or
            not). Its class must not override `train_step` or `test_step` (the
            hooks run inside the step the model's own class would replace; call
            `model.apply_hooks(grads)` from such a step instead).
        hooks: a list of `keras_custom.Hook` instances (run in list order); `[]`
            removes the hooks.

    Returns:
        `model` itself, whose `fit`, `evaluate` and `train_on_batch` now run the
        hooks, and whose `compile(...)` keeps them unless it passes `hooks=`.

    Example:

    ```python
    import keras
    import numpy as np
    import keras_custom as kc

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    kc.attach(model, [kc.hooks.ClipByGlobalNorm(1.0), kc.hooks.LogGradNorm()])
    history = model.fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0)
    assert isinstance(model, keras.Sequential) and "grad_norm" in history.history
    ```
    """
    if not isinstance(model, _KerasModel):
        raise TypeError(
            "attach: `model` must be a keras.Model instance (Functional, "
            "Sequential, a subclass, a KerasHub task, ...). "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    hooks = validate_hooks(hooks, where="attach")
    if isinstance(model, Trainer):
        model._kc_attach(hooks)
        return model
    cls = type(model)
    for stage in ("train_step", "test_step"):
        owner = _defined_by(cls, stage)
        if owner is not None:
            raise TypeError(
                f"attach: the class {cls.__name__} of `model` overrides `{stage}` "
                f"(in {owner.__module__}.{owner.__qualname__}); hooks cannot be put "
                "inside a step the model's own class writes. Call "
                "`self.apply_hooks(grads)` from that step instead of "
                "`self.optimizer.apply(grads)` (see the guide 'A custom training "
                f"loop'). Received: model of class {cls.__name__}"
            )
    model.__class__ = hooked_class(cls)
    try:
        model._kc_attach(hooks)
    except Exception:
        model.__class__ = cls
        raise
    return model


def attach_restored(model, hooks, accumulation_steps=None):
    """Gives a model loaded from a file the hooks (and, for an attached model,
    the gradient accumulation) it was saved with."""
    if isinstance(model, Trainer):
        accumulator = model._kc.accumulator if model._kc is not None else None
        model._kc_install(tuple(hooks), accumulator)
        return model
    attach(model, hooks)
    if accumulation_steps and getattr(model, "optimizer", None) is not None:
        model._kc_install(
            model._kc.hooks, accumulation.resume(model.optimizer, accumulation_steps)
        )
    return model


def hooked_class(cls):
    """The subclass of `cls` with the hooked step (made once per class)."""
    hooked = _HOOKED.get(cls)
    if hooked is None:
        hooked = type(
            cls.__name__,
            (Trainer, cls),
            {
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__doc__": cls.__doc__,
                "_kc_saved_class": cls,
                "_kc_attached": True,
            },
        )
        _HOOKED[cls] = hooked
    return hooked


def _defined_by(cls, name):
    """The user class (not Keras's, not ours) in `cls`'s MRO that defines `name`."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            module = klass.__module__ or ""
            if module == "keras" or module.startswith(("keras.", "keras_custom.")):
                return None
            return klass
    return None
