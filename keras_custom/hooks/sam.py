"""Two-pass hooks: a second forward/backward pass on the same batch."""

import keras
from keras import ops

from keras_custom.hook import Hook
from keras_custom.hook import Strength
from keras_custom.hooks.clipping import global_norm


def sam_perturbation(grads, rho, eps=1e-12):
    """The ascent step of SAM: `e = rho * g / ||g||` (global L2 norm).

    Args:
        grads: a list of tensors (`None` entries give `None`).
        rho: the radius of the neighbourhood, > 0.
        eps: added to the norm, so a zero gradient gives a zero step.

    Returns:
        The perturbations, same order.

    Example:

    >>> e = sam_perturbation([keras.ops.array([3.0, 4.0])], rho=0.5)
    >>> [round(v, 6) for v in keras.ops.convert_to_numpy(e[0]).tolist()]
    [0.3, 0.4]
    """
    scale = ops.cast(rho, "float32") / (global_norm(grads) + eps)
    return [
        None if g is None else ops.multiply(g, ops.cast(scale, g.dtype)) for g in grads
    ]


@keras.saving.register_keras_serializable(package="keras_custom")
class SharpnessAware(Hook):
    """Sharpness-Aware Minimization (SAM): the gradient at the worst nearby point.

    At each step it moves the weights to `w + e` with `e = rho * g / ||g||`
    (`g` the gradient it receives), computes the gradient of the same batch's loss
    there (a second forward and backward pass, `model.gradients_at_current_weights`),
    puts the weights back exactly as they were, and passes the second gradient on.
    The optimizer then updates `w` with it. Hooks before it shape the ascent
    direction; hooks after it (a clipping hook, say) see the SAM gradient.

    Every step costs two forward/backward passes, also outside a
    `start_step`/`stop_step` window (the hook's result is then discarded). The
    second pass runs the model with `training=True` again, so layers that update
    state in the forward pass (`BatchNormalization`'s moving statistics) update it
    twice per step. Nothing is logged by the second pass.

    Args:
        rho: the neighbourhood radius, a float > 0 or a `LearningRateSchedule`
            (the paper uses 0.05 for most image tasks).
        **kwargs: `start_step`, `stop_step`, `name` (see `Hook`).

    Example:

    ```python
    import keras
    import numpy as np
    import keras_custom as kc

    model = kc.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse",
                  hooks=[kc.hooks.SharpnessAware(rho=0.05),
                         kc.hooks.ClipByGlobalNorm(1.0)])
    model.fit(np.ones((8, 4)), np.ones((8, 1)), epochs=1, verbose=0)
    ```

    References:
        Foret, Kleiner, Mobahi, Neyshabur. Sharpness-Aware Minimization for
        Efficiently Improving Generalization. ICLR 2021.
        https://arxiv.org/abs/2010.01412
    """

    rho = Strength(minimum=0.0)

    def __init__(self, rho=0.05, **kwargs):
        super().__init__(**kwargs)
        self.rho = rho

    def process_gradients(self, grads, variables, step):
        model = self.step_state.model
        picked = [i for i, g in enumerate(grads) if g is not None]
        if not picked:
            return grads
        moved = [variables[i] for i in picked]
        perturbation = sam_perturbation(
            [grads[i] for i in picked], self.strength("rho", step)
        )
        saved = [ops.copy(v.value) for v in moved]
        for v, e in zip(moved, perturbation):
            v.assign(ops.add(v.value, ops.cast(e, v.dtype)))
        second, _ = model.gradients_at_current_weights(moved)
        for v, value in zip(moved, saved):
            v.assign(value)
        out = list(grads)
        for i, g in zip(picked, second):
            out[i] = g
        return out
