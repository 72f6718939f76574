"""The backend-specific part of the step: one module per Keras backend.

`StepMixin` is the train/test step of the backend Keras runs on; `build_scope` is
where hook state and trackers are created (outside any compiled function, under the
distribution strategy's scope on TensorFlow).
"""

import keras

_BACKEND = keras.backend.backend()

if _BACKEND == "tensorflow":
    from keras_custom.backend.tensorflow import StepMixin as StepMixin
    from keras_custom.backend.tensorflow import build_scope as build_scope
elif _BACKEND == "jax":
    from keras_custom.backend.jax import StepMixin as StepMixin
    from keras_custom.backend.jax import build_scope as build_scope
elif _BACKEND == "torch":
    from keras_custom.backend.torch import StepMixin as StepMixin
    from keras_custom.backend.torch import build_scope as build_scope
else:
    raise ImportError(
        f"keras_custom supports the tensorflow, jax and torch backends. "
        f"Received: KERAS_BACKEND={_BACKEND!r}"
    )
