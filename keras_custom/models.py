"""`Model` and `Sequential`: drop-in replacements for the Keras classes."""

import keras
from keras.src.models import functional as keras_functional
from keras.src.models.model import Trainer as _BackendTrainer
from keras.src.models.model import functional_init_arguments

from keras_custom.backend import StepMixin
from keras_custom.trainer import HookedTrainer

_KerasFunctional = keras_functional.Functional


@keras.saving.register_keras_serializable(package="keras_custom")
class Model(StepMixin, HookedTrainer, keras.Model):
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
        if cls is Model and functional_init_arguments(args, kwargs):
            return keras.Model.__new__(Functional)
        return keras.Model.__new__(cls)

    def __init__(self, *args, **kwargs):
        if functional_init_arguments(args, kwargs):
            if not isinstance(self, _KerasFunctional):
                _inject_functional(type(self))
            _BackendTrainer.__init__(self)
            _KerasFunctional.__init__(self, *args, **kwargs)
        else:
            keras.Model.__init__(self, *args, **kwargs)


@keras.saving.register_keras_serializable(package="keras_custom")
class Functional(Model, _KerasFunctional):
    """What `keras_custom.Model(inputs, outputs)` builds: a Keras functional model
    with the hooked step. You do not create it directly."""


@keras.saving.register_keras_serializable(package="keras_custom")
class Sequential(StepMixin, HookedTrainer, keras.Sequential):
    """A `keras.Sequential` whose train and test steps run hooks.

    Example:

    >>> import keras
    >>> import keras_custom as kc
    >>> model = kc.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse", hooks=[kc.hooks.WeightPenalty(l2=1e-4)])
    >>> model.hooks[0].get_config()["l2"]
    0.0001
    """


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
