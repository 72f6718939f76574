"""`Model` and `Sequential`: drop-in replacements for the Keras classes.

Each is the Keras class with the backend's `Trainer` (`keras_custom/backend/`)
mixed in before it. Their `.keras` files name the Keras class (`Sequential`,
`Functional`) and load as plain Keras models where keras_custom is not installed;
where it is imported they load as ours, with their hooks.
"""

import keras

from keras_custom import _keras
from keras_custom.backend import Trainer

# The real Keras classes, kept at import: a user may rebind `keras.Model =
# keras_custom.Model` to adopt ours everywhere, and ours must still reach Keras's.
_KerasModel = keras.Model


@keras.saving.register_keras_serializable(package="keras_custom")
class Model(Trainer, keras.Model):
    """A `keras.Model` whose train and test steps run hooks.

    Use it as `keras.Model`: functional (`Model(inputs, outputs)`) or subclassed
    (`class Net(Model)`). `compile` takes `hooks=[...]`; with none, training is
    exactly that of Keras.

    Example:

    >>> import keras
    >>> import keras_custom as kc
    >>> inputs = keras.Input((4,))
    >>> model = kc.Model(inputs, keras.layers.Dense(1)(inputs))
    >>> model.compile("sgd", "mse", hooks=[kc.hooks.ClipByGlobalNorm(1.0)])
    >>> [type(h).__name__ for h in model.hooks]
    ['ClipByGlobalNorm']
    """

    def __new__(cls, *args, **kwargs):
        if cls is Model and _keras.functional_init_arguments(args, kwargs):
            return _KerasModel.__new__(Functional)
        return _KerasModel.__new__(cls)

    def __init__(self, *args, **kwargs):
        if _keras.functional_init_arguments(args, kwargs):
            if not isinstance(self, _keras.Functional):
                _inject_functional(type(self))
            _keras.KerasBackendTrainer.__init__(self)
            _keras.Functional.__init__(self, *args, **kwargs)
        else:
            _KerasModel.__init__(self, *args, **kwargs)


@keras.saving.register_keras_serializable(package="keras_custom")
class Functional(Model, _keras.Functional):
    """What `keras_custom.Model(inputs, outputs)` builds: a Keras functional model
    with the hooked step. You do not create it directly."""

    _kc_own_class = "keras_custom>Functional"
    _kc_saved_class = _keras.Functional


@keras.saving.register_keras_serializable(package="keras_custom")
class Sequential(Trainer, keras.Sequential):
    """A `keras.Sequential` whose train and test steps run hooks.

    Example:

    >>> import keras
    >>> import keras_custom as kc
    >>> model = kc.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse", hooks=[kc.hooks.WeightPenalty(l2=1e-4)])
    >>> model.hooks[0].get_config()["l2"]
    0.0001
    """

    _kc_own_class = "keras_custom>Sequential"
    _kc_saved_class = keras.Sequential


def _inject_functional(cls):
    """Puts `Functional` in the bases of a user's subclass of `Model`.

    Keras does this for `keras.Model` subclasses built with `(inputs, outputs)`
    but rewrites every class up to `keras.Model`, ours included, which would turn
    `keras_custom.Model` into a functional class for every later subclass. Here
    the rewrite stops at our `Model`: only the user's own classes change.
    """
    if cls is Model:
        return Functional
    if cls is object or not issubclass(cls, Model) or issubclass(cls, Functional):
        return cls
    cls.__bases__ = tuple(_inject_functional(base) for base in cls.__bases__)
    return cls
