"""The backend-specific part of the step: one trainer class per Keras backend.

Each `backend/<name>.py` defines a class that inherits the shared
`keras_custom.step.trainer.Trainer` and overrides only what differs on that
backend. `Trainer` below is the one of the backend Keras runs on; only its module
is imported (a JAX or PyTorch user needs no TensorFlow).
"""

import keras

_BACKEND = keras.backend.backend()

if _BACKEND == "tensorflow":
    from keras_custom.backend.tensorflow import TensorFlowTrainer as Trainer
elif _BACKEND == "jax":
    from keras_custom.backend.jax import JAXTrainer as Trainer
elif _BACKEND == "torch":
    from keras_custom.backend.torch import TorchTrainer as Trainer
else:
    raise ImportError(
        "keras_custom supports the tensorflow, jax and torch backends. "
        f"Received: KERAS_BACKEND={_BACKEND!r}"
    )

__all__ = ["Trainer"]
