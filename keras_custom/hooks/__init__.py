"""The built-in hooks, one module per family."""

from keras_custom.hooks.clipping import ClipByGlobalNorm as ClipByGlobalNorm
from keras_custom.hooks.clipping import ClipByNorm as ClipByNorm
from keras_custom.hooks.clipping import ClipByValue as ClipByValue
from keras_custom.hooks.clipping import clip_by_global_norm as clip_by_global_norm
from keras_custom.hooks.clipping import clip_by_norm as clip_by_norm
from keras_custom.hooks.clipping import clip_by_value as clip_by_value
from keras_custom.hooks.clipping import global_norm as global_norm
from keras_custom.hooks.logging import LogGradNorm as LogGradNorm
from keras_custom.hooks.logging import LogLearningRate as LogLearningRate
from keras_custom.hooks.logging import LogWeightNorm as LogWeightNorm
from keras_custom.hooks.penalties import WeightPenalty as WeightPenalty
from keras_custom.hooks.penalties import weight_penalty as weight_penalty
