"""keras_custom: Keras models whose train step runs pluggable, serializable hooks."""

# ruff: noqa: E402
from keras_custom import _quiet

if _quiet.is_demo_process():  # the demo silences TensorFlow's start-up logs
    _quiet.quiet_startup()

from keras_custom import hooks as hooks
from keras_custom.attach import attach as attach
from keras_custom.hook import Hook as Hook
from keras_custom.hook import Strength as Strength
from keras_custom.models import Functional as Functional
from keras_custom.models import Model as Model
from keras_custom.models import Sequential as Sequential
from keras_custom.step.state import StepState as StepState

__version__ = "0.2.0"
