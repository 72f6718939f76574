"""`attach`: hooks on a Keras model that was not built from `kc.Model`.

`kc.attach(model, hooks)` gives any `keras.Model` instance (Functional, Sequential,
a subclass of the user's, a KerasHub task, a `keras.applications` network) the
hooked step. The instance's class is replaced by a subclass of it that puts the
backend's `Trainer` first (one subclass per class, made once, with the same name):
`isinstance` with the model's own class still holds, and `.keras` files name that
class, so they load without keras_custom (see `keras_custom/step/saving.py`).
"""

import warnings

import keras

from keras_custom.backend import Trainer
from keras_custom.step import accumulation
from keras_custom.step.pipeline import validate_hooks
from keras_custom.step.trainer import attributes_kept_on_error

_KerasModel = keras.Model  # kept at import (see `keras_custom/models.py`)
_HOOKED = {}


def attach(model, hooks):
    """Gives an existing Keras model the hooked train and test steps.

    Args:
        model: a `keras.Model` instance of any class (built or not, compiled or
            not). Its class must not override `train_step` or `test_step`: hooks
            cannot run inside a step the class writes itself (derive such a class
            from `keras_custom.Model` and call `self.apply_hooks(grads)` in its
            step). Nor may it define an attribute the hooked step uses (`hooks`,
            `apply_hooks`, `forward_pass`, ...).
        hooks: a list of `keras_custom.Hook` instances (run in list order); `[]`
            removes the hooks.

    Returns:
        `model` itself, whose `fit`, `evaluate`, `train_on_batch` and
        `test_on_batch` now run the hooks (a step compiled before is traced
        again), and whose `compile(...)` keeps them unless it passes `hooks=`.
        `isinstance(model, its_class)` still holds; `type(model)` is a subclass
        of its class with the same name, and its `.keras` files name its class.

    Raises:
        TypeError: `model` is not a `keras.Model` instance, its class writes its
            own step or has an attribute the step would hide, or `hooks` is not
            a list of hooks.
        ValueError: a hook already belongs to another model, or is in the list
            twice.

    In every case the model is left as it was.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse")
    >>> hooks = [kc.hooks.ClipByGlobalNorm(1.0), kc.hooks.LogGradNorm()]
    >>> kc.attach(model, hooks) is model
    True
    >>> history = model.fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0)
    >>> isinstance(model, keras.Sequential), "grad_norm" in history.history
    (True, True)
    """
    if isinstance(model, type) and issubclass(model, _KerasModel):
        raise TypeError(
            "attach: `model` must be a keras.Model instance; this is the class "
            f"{model.__name__}, not a model made from it. Received: model={model!r}"
        )
    if not isinstance(model, _KerasModel):
        raise TypeError(
            "attach: `model` must be a keras.Model instance (Functional, "
            "Sequential, a subclass, a KerasHub task, ...). "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    hooks = validate_hooks(hooks, where="attach")
    if isinstance(model, Trainer):
        _install(model, hooks)
        _drop_compiled_steps(model)
        return model
    cls = type(model)
    for stage in ("train_step", "test_step"):
        owner = _defined_by(cls, stage)
        if owner is not None:
            raise TypeError(
                f"attach: the class {cls.__name__} of `model` overrides `{stage}` "
                f"(in {owner.__module__}.{owner.__qualname__}); hooks cannot be put "
                "inside a step the model's own class writes. Either drop the "
                "override and attach hooks that do its work (guide 'Migrate a "
                "hand-written train_step'), or keep it, derive the class from "
                "`keras_custom.Model` and call `self.apply_hooks(grads)` from it "
                "instead of `self.optimizer.apply(grads)`. Received: model of "
                f"class {cls.__name__}"
            )
    taken = _names_taken(model, cls)
    if taken:
        raise TypeError(
            f"attach: the model (class {cls.__name__}) has its own "
            f"{', '.join(f'`{n}`' for n in taken)}, which the hooked step uses "
            "for something else: attaching would hide it. Rename it in the model's "
            "class, or build the model from `keras_custom.Model`. Received: model "
            f"of class {cls.__name__}"
        )
    _set_class(model, hooked_class(cls))
    try:
        _install(model, hooks)
    except Exception:
        _set_class(model, cls)
        raise
    _drop_compiled_steps(model)
    return model


def attach_restored(model, hooks, accumulation_steps=None):
    """Gives a model loaded from a file the hooks (and, for an attached model,
    the gradient accumulation) it was saved with."""
    if isinstance(model, Trainer):
        accumulator = model._kc.accumulator if model._kc is not None else None
        model._kc_install(tuple(hooks), accumulator)
        return model
    try:
        attach(model, hooks)
    except ValueError as e:
        # A hook refuses the model as it loads (a pattern that matched LoRA
        # variables: a KerasHub file holds the kernels with LoRA merged in). The
        # file still loads, as it would without keras_custom.
        warnings.warn(
            "keras_custom: the file's hooks were not restored; the model loads "
            f"without them (as where keras_custom is not installed). {e}",
            stacklevel=4,
        )
        return model
    if accumulation_steps and getattr(model, "optimizer", None) is not None:
        if model._kc_overridden_by_user("compile"):
            # Keras did not compile the model from the file (its class has its
            # own `compile`): its optimizer is not the saved one, and the saved
            # accumulators may not fit the variables that train now.
            warnings.warn(
                "keras_custom: gradient accumulation "
                f"(gradient_accumulation_steps={accumulation_steps}) is not "
                f"restored: {type(model).__name__} overrides `compile`, so Keras "
                "did not compile it from the file. Compile it again (with "
                f"gradient_accumulation_steps={accumulation_steps}); the hooks "
                "stay.",
                stacklevel=4,
            )
            return model
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


def _install(model, hooks):
    """`model._kc_attach(hooks)`; a failure (a hook that refuses the model in its
    `build`) leaves the model's attributes as they were."""
    with attributes_kept_on_error(model):
        model._kc_attach(hooks)


def _set_class(model, cls):
    # Not `model.__class__ = cls`: on TensorFlow, Keras's `__setattr__` skips an
    # assignment whose value `getattr` already returns (while a file is written,
    # a hooked model's `__class__` reads its original class: `Trainer.__class__`).
    object.__setattr__(model, "__class__", cls)


def _drop_compiled_steps(model):
    """Forgets the train and test functions `fit` and `evaluate` compiled before
    (`make_train_function` reuses one that exists): the next call traces the
    hooked step. They are public attributes of every Keras model."""
    for name in ("train_function", "test_function"):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


def _names_taken(model, cls):
    """The names of our step's own API (not `keras.Model`'s) that the model's
    class or the instance defines: the hooked class would hide them."""
    taken = []
    for name in _own_api():
        if name in model.__dict__ or _defined_by(cls, name) is not None:
            taken.append(name)
    return taken


_OWN_API = []


def _own_api():
    """Public attributes that our `Trainer` adds to a `keras.Model`."""
    if not _OWN_API:
        names = {
            name
            for klass in Trainer.__mro__
            if (klass.__module__ or "").startswith("keras_custom.")
            for name in vars(klass)
            if not name.startswith("_")
        }
        _OWN_API.extend(sorted(names - set(dir(_KerasModel))))
    return _OWN_API


def _defined_by(cls, name):
    """The user class (not Keras's, not ours) in `cls`'s MRO that defines `name`."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            module = klass.__module__ or ""
            if module == "keras" or module.startswith(("keras.", "keras_custom.")):
                return None
            return klass
    return None
