"""Privacy accounting for DP-SGD with Google's `dp-accounting` package.

The mechanism accounted for is `steps` compositions of the Poisson-subsampled
Gaussian mechanism: at each step every example joins the batch independently
with probability `sample_rate`, and Gaussian noise of standard deviation
`noise_multiplier * l2_norm_clip` is added to the sum of the clipped per-example
gradients. Neighbouring datasets differ by adding or removing one example. In
`dp_accounting` terms: `SelfComposedDpEvent(PoissonSampledDpEvent(sample_rate,
GaussianDpEvent(noise_multiplier)), steps)`.

Two accountants:

* `"pld"` (default): privacy loss distributions (`dp_accounting.pld`), tight up
  to its discretization; about 0.1-1.5 s per call on a laptop-class CPU.
* `"rdp"`: Rényi DP (`dp_accounting.rdp`), an upper bound (typically a 10-30 %
  larger epsilon), about 0.05 s per call.

`dp-accounting` is an optional dependency: `pip install "keras_custom[privacy]"`.

References:
    Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang. Deep Learning with
    Differential Privacy. CCS 2016. https://arxiv.org/abs/1607.00133

    Doroshenko, Ghazi, Kamath, Kumar, Manurangsi. Connect the Dots: Tighter
    Discrete Approximations of Privacy Loss Distributions. PETS 2022.
    https://arxiv.org/abs/2207.04380
"""

import math
import numbers

ACCOUNTANTS = ("pld", "rdp")
PLD_DISCRETIZATION = 1e-4


def _dp_accounting(caller):
    try:
        import dp_accounting
    except ImportError:
        raise ImportError(
            f"{caller} needs Google's `dp-accounting` package: "
            "pip install 'keras_custom[privacy]' (or pip install dp-accounting)."
        ) from None
    return dp_accounting


def _real(caller, name, value, low, high=math.inf, low_ok=False, high_ok=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{caller}: `{name}` must be a float. Received: {name}={value!r} of "
            f"type {type(value).__name__}"
        )
    value = float(value)
    above = value >= low if low_ok else value > low
    below = value <= high if high_ok else value < high
    if not (above and below) or math.isnan(value):
        left = "[" if low_ok else "("
        right = "]" if high_ok else ")"
        raise ValueError(
            f"{caller}: `{name}` must be in {left}{low:g}, {high:g}{right}. "
            f"Received: {name}={value!r}"
        )
    return value


def _steps(caller, steps):
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(
            f"{caller}: `steps` must be an integer >= 0. Received: steps={steps!r}"
        )
    return int(steps)


def _accountant_name(caller, accountant):
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"{caller}: `accountant` must be one of {list(ACCOUNTANTS)}. "
            f"Received: accountant={accountant!r}"
        )
    return accountant


def make_accountant(accountant="pld"):
    """A fresh `dp_accounting` accountant: `"pld"` or `"rdp"`."""
    dp_accounting = _dp_accounting("make_accountant")
    _accountant_name("make_accountant", accountant)
    if accountant == "pld":
        return dp_accounting.pld.PLDAccountant(
            value_discretization_interval=PLD_DISCRETIZATION
        )
    return dp_accounting.rdp.RdpAccountant()


def dp_event(noise_multiplier, sample_rate, steps):
    """The `dp_accounting.DpEvent` of `steps` Poisson-sampled Gaussian steps."""
    dp_accounting = _dp_accounting("dp_event")
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
        ),
        int(steps),
    )


def epsilon(noise_multiplier, sample_rate, steps, delta, accountant="pld"):
    """The epsilon spent by `steps` steps of DP-SGD with Poisson sampling.

    Args:
        noise_multiplier: the noise's standard deviation over the clip norm
            (`sigma`), a float >= 0 (0: no privacy, epsilon is infinite).
        sample_rate: the probability that an example joins a batch, in (0, 1]:
            `expected_batch_size / num_examples`.
        steps: the number of noisy updates, an integer >= 0.
        delta: the delta of (epsilon, delta)-DP, in (0, 1); usually below
            `1 / num_examples`.
        accountant: `"pld"` (privacy loss distributions, tight; default) or
            `"rdp"` (Rényi DP, a faster upper bound).

    Returns:
        epsilon, a float (`inf` for `noise_multiplier=0` and `steps > 0`).

    Example:

    >>> round(epsilon(1.1, 256 / 60000, 2345, 1e-5, accountant="rdp"), 2)
    1.1
    """
    caller = "epsilon"
    noise_multiplier = _real(caller, "noise_multiplier", noise_multiplier, 0, low_ok=True)
    sample_rate = _real(caller, "sample_rate", sample_rate, 0, 1, high_ok=True)
    steps = _steps(caller, steps)
    delta = _real(caller, "delta", delta, 0, 1)
    _accountant_name(caller, accountant)
    _dp_accounting(caller)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0.0:
        return math.inf
    acc = make_accountant(accountant)
    acc.compose(dp_event(noise_multiplier, sample_rate, steps))
    return float(acc.get_epsilon(delta))


def noise_multiplier_for_epsilon(
    target_epsilon, sample_rate, steps, delta, accountant="pld", tol=1e-3
):
    """The smallest noise multiplier whose epsilon after `steps` steps is at most
    `target_epsilon` (to `tol`).

    Bisection (`dp_accounting.calibrate_dp_mechanism`). For PLD the bracket comes
    from the fast RDP answer (RDP over-estimates epsilon, so its noise multiplier
    is an upper bound), which keeps the slow PLD evaluations few (still some
    seconds to a minute).

    Args:
        target_epsilon: a float > 0.
        sample_rate: as `epsilon`.
        steps: as `epsilon` (>= 1).
        delta: as `epsilon`.
        accountant: as `epsilon`.
        tol: the tolerance on the noise multiplier.

    Returns:
        The noise multiplier, a float.

    Example:

    >>> sigma = noise_multiplier_for_epsilon(3.0, 0.01, 1000, 1e-5, accountant="rdp")
    >>> epsilon(sigma, 0.01, 1000, 1e-5, accountant="rdp") <= 3.0
    True
    """
    caller = "noise_multiplier_for_epsilon"
    target_epsilon = _real(caller, "target_epsilon", target_epsilon, 0)
    sample_rate = _real(caller, "sample_rate", sample_rate, 0, 1, high_ok=True)
    steps = _steps(caller, steps)
    if steps == 0:
        raise ValueError(f"{caller}: `steps` must be >= 1. Received: steps={steps!r}")
    delta = _real(caller, "delta", delta, 0, 1)
    tol = _real(caller, "tol", tol, 0)
    _accountant_name(caller, accountant)
    dp_accounting = _dp_accounting(caller)

    def calibrate(kind, bracket):
        return float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: make_accountant(kind),
                lambda sigma: dp_event(sigma, sample_rate, steps),
                target_epsilon,
                delta,
                bracket,
                tol=tol,
            )
        )

    sigma_rdp = calibrate("rdp", dp_accounting.LowerEndpointAndGuess(0.05, 1.0))
    if accountant == "rdp":
        return sigma_rdp
    bracket = dp_accounting.ExplicitBracketInterval(0.5 * sigma_rdp, sigma_rdp)
    return calibrate("pld", bracket)
