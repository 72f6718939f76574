"""Poisson-sampled batches: the sampling the privacy accounting assumes.

`fit(x, y, batch_size=...)` shuffles the data and cuts it into batches of a fixed
size; each example is in exactly one batch per epoch. The usual DP-SGD accounting
(`keras_custom.privacy.epsilon`) assumes instead that at every step each example
joins the batch independently with probability `q = expected_batch_size / n`, so
batch sizes vary. `poisson_batches` feeds `fit` such batches.
"""

import secrets

import keras
import numpy as np
from keras import tree

from keras_custom import _validation


def _check_int(name, value, minimum):
    return _validation.integer("poisson_batches", name, value, minimum)


class PoissonBatches(keras.utils.PyDataset):
    """Batches in which each example appears independently with probability
    `q = expected_batch_size / n`; made by `poisson_batches`."""

    def __init__(
        self,
        x,
        y,
        expected_batch_size,
        seed=None,
        sample_weight=None,
        steps=None,
        pad_to_multiple_of=None,
    ):
        super().__init__()
        first = tree.flatten(x)[0]
        n = len(first)
        for name, data in (("x", x), ("y", y), ("sample_weight", sample_weight)):
            if data is None:
                continue
            for leaf in tree.flatten(data):
                if len(leaf) != n:
                    raise ValueError(
                        f"poisson_batches: every array of `x`, `y` and "
                        f"`sample_weight` must have {n} examples (the first array "
                        f"of `x` has). Received: an array of {len(leaf)} in `{name}`"
                    )
        if y is None:
            raise ValueError(
                "poisson_batches: `y` is required (a per-example loss needs each "
                "example's target). Received: y=None"
            )
        expected_batch_size = _check_int("expected_batch_size", expected_batch_size, 1)
        if expected_batch_size > n:
            raise ValueError(
                "poisson_batches: `expected_batch_size` must be at most the number "
                f"of examples ({n}). Received: expected_batch_size={expected_batch_size}"
            )
        if seed is None:
            seed = secrets.randbits(63)  # secret: which examples were drawn is too
        seed = _check_int("seed", seed, 0)
        if steps is None:
            steps = max(1, round(n / expected_batch_size))
        steps = _check_int("steps", steps, 1)
        if pad_to_multiple_of is None:
            pad_to_multiple_of = max(1, expected_batch_size // 8)
        pad_to_multiple_of = _check_int("pad_to_multiple_of", pad_to_multiple_of, 1)
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.num_examples = n
        self.expected_batch_size = expected_batch_size
        self.sample_rate = expected_batch_size / n
        self.steps = steps
        self.pad_to_multiple_of = pad_to_multiple_of
        self._seed = seed
        self.epoch = 0

    def __len__(self):
        return self.steps

    def indices(self, index, epoch=None):
        """The examples drawn for batch `index` of `epoch` (default: the current
        one), as an array of indices (the same every time it is asked)."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self._seed, epoch, index])
        return np.flatnonzero(rng.random(self.num_examples) < self.sample_rate)

    def __getitem__(self, index):
        if not 0 <= index < self.steps:
            raise IndexError(index)
        picked = self.indices(index)
        size = len(picked)
        multiple = self.pad_to_multiple_of
        padded = max(multiple, -(-size // multiple) * multiple)
        # Padding examples: copies of example 0 with weight 0 (no loss, no
        # gradient); they keep the number of batch shapes (and traces) small.
        rows = np.concatenate([picked, np.zeros(padded - size, dtype=picked.dtype)])
        weights = np.zeros(padded, "float32")
        if self.sample_weight is None:
            weights[:size] = 1.0
        else:
            given = np.asarray(self.sample_weight, "float32")[picked]
            weights = np.zeros((padded,) + given.shape[1:], "float32")
            weights[:size] = given

        def take(a):
            return np.asarray(a)[rows]

        return tree.map_structure(take, self.x), tree.map_structure(take, self.y), weights

    def on_epoch_end(self):
        self.epoch += 1


def poisson_batches(
    x,
    y,
    expected_batch_size,
    seed=None,
    sample_weight=None,
    steps=None,
    pad_to_multiple_of=None,
):
    """Poisson-sampled batches for `fit`: what the privacy accounting assumes.

    At each step every example joins the batch independently with probability
    `q = expected_batch_size / n`, so a batch has `expected_batch_size` examples
    on average (some may have none). Give `DifferentialPrivacy` the same
    `expected_batch_size`: it then divides the noisy sum by it, as the analysis
    behind the accounting does, and reports epsilon for `q`.

    Each batch is padded with examples of sample weight 0 (copies of the first
    example: they add nothing to the loss's gradient) to a multiple of
    `pad_to_multiple_of`, so that a compiled step sees few batch shapes (each new
    shape is a new trace) and an empty draw is still a step (the noise alone), as
    the accounting requires. The padding examples count in the logged `loss`
    (whose mean over the batch they dilute), never in the gradient.

    Args:
        x: an array (or a nested structure of arrays) of `n` examples on its
            first axis.
        y: the targets, with the same number of examples.
        expected_batch_size: the mean batch size, an integer from 1 to `n`.
        seed: an integer for a reproducible draw, or `None` for a secret one
            drawn from the operating system (the privacy guarantee assumes that
            nobody knows which examples were drawn).
        sample_weight: optional per-example weights, multiplied in.
        steps: batches per epoch (default `round(n / expected_batch_size)`:
            one epoch in expectation).
        pad_to_multiple_of: the batch sizes' multiple (default
            `max(1, expected_batch_size // 8)`).

    Returns:
        A `keras.utils.PyDataset` of `(x, y, sample_weight)` batches, new draws
        each epoch; pass it to `fit` as `x` (no `y`, `batch_size`).

    Example:

    >>> import numpy as np
    >>> batches = poisson_batches(np.arange(1000.0), np.zeros(1000), 100, seed=0)
    >>> len(batches), batches.sample_rate
    (10, 0.1)
    >>> x, y, w = batches[0]
    >>> len(x) % 12 == 0 and int(w.sum()) == len(batches.indices(0))
    True
    """
    return PoissonBatches(
        x,
        y,
        expected_batch_size,
        seed=seed,
        sample_weight=sample_weight,
        steps=steps,
        pad_to_multiple_of=pad_to_multiple_of,
    )
