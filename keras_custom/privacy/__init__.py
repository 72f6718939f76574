"""Differentially private training: accounting, Poisson sampling, per-example math.

The hook is `keras_custom.hooks.DifferentialPrivacy`; this package holds what it
is built from and what a user calls around it:

- `epsilon(noise_multiplier, sample_rate, steps, delta, accountant="pld")` and
  `noise_multiplier_for_epsilon(...)` (Google's `dp-accounting`, an optional
  dependency: `pip install "keras_custom[privacy]"`);
- `poisson_batches(x, y, expected_batch_size, seed)`: batches for `fit` sampled as
  the accounting assumes;
- `ghost`: per-example gradient norms of Dense, EinsumDense and Embedding layers
  without per-example gradients, and `clip_factors`.
"""

from keras_custom.privacy import ghost as ghost
from keras_custom.privacy.accounting import dp_event as dp_event
from keras_custom.privacy.accounting import epsilon as epsilon
from keras_custom.privacy.accounting import make_accountant as make_accountant
from keras_custom.privacy.accounting import (
    noise_multiplier_for_epsilon as noise_multiplier_for_epsilon,
)
from keras_custom.privacy.clipping import clip_factors as clip_factors
from keras_custom.privacy.sampling import PoissonBatches as PoissonBatches
from keras_custom.privacy.sampling import poisson_batches as poisson_batches
