"""The built-in hooks, one module per family."""

from keras_custom.hooks.clipping import AdaptiveClip as AdaptiveClip
from keras_custom.hooks.clipping import ClipByGlobalNorm as ClipByGlobalNorm
from keras_custom.hooks.clipping import ClipByNorm as ClipByNorm
from keras_custom.hooks.clipping import ClipByValue as ClipByValue
from keras_custom.hooks.clipping import adaptive_clip as adaptive_clip
from keras_custom.hooks.clipping import clip_by_global_norm as clip_by_global_norm
from keras_custom.hooks.clipping import clip_by_norm as clip_by_norm
from keras_custom.hooks.clipping import clip_by_value as clip_by_value
from keras_custom.hooks.clipping import global_norm as global_norm
from keras_custom.hooks.clipping import unitwise_norm as unitwise_norm
from keras_custom.hooks.guards import SkipNonFinite as SkipNonFinite
from keras_custom.hooks.guards import all_finite as all_finite
from keras_custom.hooks.logging import LogGradNorm as LogGradNorm
from keras_custom.hooks.logging import LogLearningRate as LogLearningRate
from keras_custom.hooks.logging import LogUpdateRatio as LogUpdateRatio
from keras_custom.hooks.logging import LogWeightNorm as LogWeightNorm
from keras_custom.hooks.logging import update_ratio as update_ratio
from keras_custom.hooks.noise import GradientNoise as GradientNoise
from keras_custom.hooks.noise import add_gradient_noise as add_gradient_noise
from keras_custom.hooks.noise import noise_stddev as noise_stddev
from keras_custom.hooks.penalties import WeightPenalty as WeightPenalty
from keras_custom.hooks.penalties import weight_penalty as weight_penalty
from keras_custom.hooks.sam import SharpnessAware as SharpnessAware
from keras_custom.hooks.sam import sam_perturbation as sam_perturbation
from keras_custom.hooks.staging import Freeze as Freeze
from keras_custom.hooks.staging import optimizer_slots as optimizer_slots
