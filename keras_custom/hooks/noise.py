"""Noise hooks: random perturbations of the gradients."""

import numbers

import keras
from keras import ops

from keras_custom import _validation
from keras_custom.hook import Hook
from keras_custom.hook import Strength


def noise_stddev(step, eta=0.01, gamma=0.55):
    """The standard deviation `sqrt(eta / (1 + step) ** gamma)` (float32).

    Example:

    >>> round(float(noise_stddev(3, eta=0.16, gamma=0.5)), 6)
    0.282843
    """
    step = ops.cast(step, "float32")
    variance = ops.cast(eta, "float32") / ops.power(
        1.0 + step, ops.cast(gamma, "float32")
    )
    return ops.sqrt(variance)


def add_gradient_noise(grads, stddev, seed):
    """Adds independent Gaussian noise of standard deviation `stddev` to each gradient.

    Args:
        grads: a list of tensors (`None` entries pass through).
        stddev: a scalar.
        seed: a `keras.random.SeedGenerator` (advanced once per tensor) or an int.

    Returns:
        The noisy gradients, same order.

    Example:

    >>> seed = keras.random.SeedGenerator(0)
    >>> out = add_gradient_noise([keras.ops.zeros((2,))], 0.0, seed)
    >>> keras.ops.convert_to_numpy(out[0]).tolist()
    [0.0, 0.0]
    """
    out = []
    for g in grads:
        if g is None:
            out.append(None)
            continue
        noise = keras.random.normal(ops.shape(g), dtype=g.dtype, seed=seed)
        out.append(ops.add(g, ops.multiply(noise, ops.cast(stddev, g.dtype))))
    return out


@keras.saving.register_keras_serializable(package="keras_custom")
class GradientNoise(Hook):
    """Adds annealed Gaussian noise to the gradients.

    At optimizer step `t` (0-based) each gradient element gets independent noise
    of variance `eta / (1 + t) ** gamma`. The random stream comes from a
    `keras.random.SeedGenerator` whose state is part of the hook's saved state:
    the same `seed` gives the same noise, and a run resumed from a `.keras` file
    continues the stream where it stopped. Clipping hooks placed after it see the
    noisy gradient.

    Args:
        eta: the initial variance, a float > 0 or a `LearningRateSchedule`
            (the paper uses 0.01, 0.3 or 1.0).
        gamma: the decay exponent, a float >= 0 (the paper uses 0.55).
        seed: an int for a reproducible stream, or `None` for a seed drawn from
            Keras's global random state when the hook is built (reproducible
            after `keras.utils.set_random_seed`).
        **kwargs: `start_step`, `stop_step`, `name` (see `Hook`).

    Example:

    ```python
    import keras
    import numpy as np
    import keras_custom as kc

    model = kc.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse",
                  hooks=[kc.hooks.GradientNoise(eta=0.01, gamma=0.55, seed=1)])
    model.fit(np.ones((8, 4)), np.ones((8, 1)), epochs=1, verbose=0)
    ```

    References:
        Neelakantan, Vilnis, Le, Sutskever, Kaiser, Kurach, Martens. Adding
        Gradient Noise Improves Learning for Very Deep Networks. 2015.
        https://arxiv.org/abs/1511.06807
    """

    eta = Strength(minimum=0.0)

    def __init__(self, eta=0.01, gamma=0.55, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.eta = eta
        if (
            isinstance(gamma, bool)
            or not isinstance(gamma, numbers.Real)
            or not 0.0 <= float(gamma) < float("inf")
        ):
            raise ValueError(
                "GradientNoise: `gamma` must be a finite float >= 0. "
                f"Received: gamma={gamma!r}"
            )
        self.gamma = float(gamma)
        self.seed = _validation.optional_int(
            self, "seed", seed, 0, _validation.UINT32_MAX
        )
        self.seed_generator = None

    def build(self, model):
        self.seed_generator = keras.random.SeedGenerator(
            self.seed, name=f"{self.name}_seed_generator"
        )
        # The generator's state is a variable: saving it with the hook's state
        # makes a resumed run continue the same stream.
        self._variables.append(self.seed_generator.state)

    def process_gradients(self, grads, variables, step):
        stddev = noise_stddev(step, self.strength("eta", step), self.gamma)
        return add_gradient_noise(grads, stddev, self.seed_generator)

    def get_config(self):
        config = super().get_config()
        config.update(gamma=self.gamma, seed=self.seed)
        return config
