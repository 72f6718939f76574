"""Per-example gradient norms and clipped sums without per-example gradients.

Pure `keras.ops` functions (TensorFlow, JAX and PyTorch backends). They take what
one backward pass of the *sum* of the per-example losses gives:

* `a`: the input of a linear layer, shape `(B, ...)`;
* `g`: the gradient of `sum_i loss_i` with respect to the layer's pre-activation
  output `z = a @ W (+ b)`, shape `(B, ...)`.

Example `i`'s loss depends only on row `i` of `z`, so row `i` of `g` is example
`i`'s own gradient with respect to its own output, and example `i`'s kernel
gradient is `a_i^T g_i` (summed over positions), its bias gradient
`sum_positions g_i`. From there:

* the squared norm `||a_i^T g_i||^2` comes either from the two position Gram
  matrices, `<a_i a_i^T, g_i g_i^T>` (the "ghost norm": Goodfellow 2015 for rank 2,
  Li et al. 2022 for sequences), or from `a_i^T g_i` materialized per example,
  whichever costs fewer FLOPs (`T (d_in + d_out)` against `d_in d_out` per position
  pair, the "mixed ghost norm" rule of Bu et al. 2023);
* the clipped sum `sum_i c_i a_i^T g_i = a^T (c * g)` is one ordinary weight
  gradient with `g` rescaled ("book-keeping", Bu et al. 2023): no second backward
  pass.

Results are float32. `parse_einsum` raises `UnsupportedEquation` for an
equation without a fast path (the caller then falls back to vectorized
per-example gradients).

References:
    Goodfellow. Efficient Per-Example Gradient Computations. 2015.
    https://arxiv.org/abs/1510.01799

    Li, Tramer, Liang, Hashimoto. Large Language Models Can Be Strong
    Differentially Private Learners. ICLR 2022. https://arxiv.org/abs/2110.05679

    Bu, Wang, Zha, Karypis. Differentially Private Optimization on Large Model at
    Small Cost. ICML 2023. https://arxiv.org/abs/2210.00038
"""

import dataclasses
import math
import re
import string

from keras import ops


class UnsupportedEquation(ValueError):
    """The einsum equation has no ghost-norm rule (use the vectorized fallback)."""


@dataclasses.dataclass(frozen=True)
class EinsumSpec:
    """An EinsumDense equation with its ellipsis expanded and its letters classified.

    `lhs,kernel->out` with `batch = lhs[0] = out[0]`. Every other letter is:

    * `contracted`: in lhs and kernel, not out (the kernel's input axes);
    * `produced`: in kernel and out, not lhs (the kernel's output axes);
    * `positions`: in lhs and out, not kernel (summed in the weight gradient:
      sequence positions, heads of a projection that share one kernel, ...);
    * `shared`: in all three (block-diagonal kernel: a separate matrix per
      index, like a per-head kernel); kept apart in the norm, then summed;
    * `lhs_only`: in lhs only (summed by the forward einsum itself).
    """

    lhs: str
    kernel: str
    out: str
    batch: str
    contracted: str
    produced: str
    positions: str
    shared: str
    lhs_only: str


_EQUATION = re.compile(r"^([a-zA-Z.]+),([a-zA-Z.]+)->([a-zA-Z.]+)$")


def parse_einsum(equation: str, input_rank: int) -> EinsumSpec:
    """Parse an EinsumDense equation for an input of rank `input_rank`."""
    match = _EQUATION.match(equation.replace(" ", ""))
    if not match:
        raise UnsupportedEquation(f"cannot parse einsum equation {equation!r}")
    lhs, kernel, out = match.groups()
    if "..." in kernel:
        raise UnsupportedEquation(f"ellipsis in the kernel of {equation!r}")
    if "..." in lhs:
        # Expand the ellipsis into fresh letters (the same ones in lhs and out).
        if lhs.count("...") != 1 or out.count("...") != 1:
            raise UnsupportedEquation(f"unsupported ellipsis in {equation!r}")
        n_elided = input_rank - (len(lhs) - 3)
        if n_elided < 0:
            raise UnsupportedEquation(
                f"input rank {input_rank} too small for {equation!r}"
            )
        used = set(lhs + kernel + out)
        fresh = [ch for ch in string.ascii_letters if ch not in used][:n_elided]
        elided = "".join(fresh)
        lhs = lhs.replace("...", elided)
        out = out.replace("...", elided)
    elif "..." in out:
        raise UnsupportedEquation(f"unsupported ellipsis in {equation!r}")
    if len(lhs) != input_rank:
        raise UnsupportedEquation(
            f"equation {equation!r} does not match an input of rank {input_rank}"
        )
    for part in (lhs, kernel, out):
        if len(set(part)) != len(part):
            raise UnsupportedEquation(f"repeated letter in {part!r} of {equation!r}")
    batch = lhs[0]
    if batch in kernel or not out or out[0] != batch:
        raise UnsupportedEquation(
            f"{equation!r}: the first input axis must be the batch axis and lead "
            "the output"
        )
    L, K, O = set(lhs), set(kernel), set(out)  # noqa: E741
    if (K - L - O) or (O - L - K):
        # A kernel axis summed away in the forward, or an output axis that no
        # operand has: no ghost rule (and rarely meaningful for a layer).
        raise UnsupportedEquation(f"{equation!r} has a kernel-only or output-only axis")

    def pick(pred, source):
        return "".join(ch for ch in source if ch != batch and pred(ch))

    return EinsumSpec(
        lhs=lhs,
        kernel=kernel,
        out=out,
        batch=batch,
        contracted=pick(lambda ch: ch in K and ch not in O, lhs),
        produced=pick(lambda ch: ch in K and ch not in L, out),
        positions=pick(lambda ch: ch in O and ch not in K, lhs),
        shared=pick(lambda ch: ch in K and ch in O, lhs),
        lhs_only=pick(lambda ch: ch not in K and ch not in O, lhs),
    )


def _sizes(spec: EinsumSpec, a, g):
    """Static size of every letter (None where the shape is unknown at trace time)."""
    sizes = {}
    for letters, tensor in ((spec.lhs, a), (spec.out, g)):
        for ch, dim in zip(letters, tuple(tensor.shape)):
            if dim is not None:
                sizes[ch] = int(dim)
    return sizes


def _prod(letters, sizes):
    if any(sizes.get(ch) is None for ch in letters):
        return None
    return math.prod(sizes[ch] for ch in letters)


def _use_gram(spec: EinsumSpec, a, g) -> bool:
    """Gram ("ghost") form iff it costs fewer FLOPs than materializing a_i^T g_i.

    Per example and per `shared` index: Gram form ~ T^2 (d_in + d_out),
    direct form ~ T d_in d_out, so Gram wins iff T (d_in + d_out) < d_in d_out.
    Memory follows the same comparison (T^2 vs d_in d_out per example). Unknown
    sizes default to the Gram form (its memory does not grow with the kernel).
    """
    sizes = _sizes(spec, a, g)
    t = _prod(spec.positions, sizes)
    d_in = _prod(spec.contracted, sizes)
    d_out = _prod(spec.produced, sizes)
    if t is None or d_in is None or d_out is None:
        return True
    return t * (d_in + d_out) <= d_in * d_out


def _fresh(used, n):
    return "".join([ch for ch in string.ascii_letters if ch not in set(used)][:n])


def _batch_scale(c, rank):
    """Reshape per-example factors (B,) to broadcast against a (B, ...) tensor."""
    return ops.reshape(ops.cast(c, "float32"), (-1,) + (1,) * (rank - 1))


def einsum_sq_norms(equation, a, g, bias_axes=None, method="auto"):
    """Per-example squared gradient norm of an EinsumDense kernel (+ bias).

    Args:
        equation: the layer's einsum equation, e.g. `"abc,cde->abde"`.
        a: the layer input, `(B, ...)`.
        g: gradient of the summed loss w.r.t. the pre-activation output.
        bias_axes: the layer's `bias_axes` string (output letters) or None.
        method: `"auto"`, `"gram"` or `"direct"` (testing/benchmarking).

    Returns:
        float32 tensor `(B,)`: `||dL_i/dkernel||^2 + ||dL_i/dbias||^2`.
    """
    spec = parse_einsum(equation, len(a.shape))
    a = ops.cast(a, "float32")
    g = ops.cast(g, "float32")
    lhs = spec.lhs
    if spec.lhs_only:  # summed by the forward einsum anyway: sum a first
        lhs = "".join(ch for ch in spec.lhs if ch not in spec.lhs_only)
        a = ops.einsum(f"{spec.lhs}->{lhs}", a)
    if method == "auto":
        method = "gram" if _use_gram(spec, a, g) else "direct"
    b, s, p = spec.batch, spec.shared, spec.positions
    if method == "gram":
        # Rename the position letters in the second factor: t vs t'.
        p2 = _fresh(spec.lhs + spec.kernel + spec.out, len(p))
        rename = str.maketrans(p, p2) if p else None
        lhs2 = lhs.translate(rename) if p else lhs
        out2 = spec.out.translate(rename) if p else spec.out
        gram_a = ops.einsum(f"{lhs},{lhs2}->{b}{s}{p}{p2}", a, a)
        gram_g = ops.einsum(f"{spec.out},{out2}->{b}{s}{p}{p2}", g, g)
        kernel_sq = ops.einsum(f"{b}{s}{p}{p2},{b}{s}{p}{p2}->{b}", gram_a, gram_g)
        # <A A^T, G G^T> = ||A^T G||^2 >= 0; rounding can make it slightly negative.
        kernel_sq = ops.maximum(kernel_sq, 0.0)
    elif method == "direct":
        per_example = ops.einsum(f"{lhs},{spec.out}->{b}{spec.kernel}", a, g)
        kernel_sq = ops.sum(
            ops.square(per_example), axis=tuple(range(1, len(per_example.shape)))
        )
    else:
        raise ValueError(f"unknown method {method!r}")
    if bias_axes:
        return kernel_sq + _bias_sq_norms(spec, g, bias_axes)
    return kernel_sq


def _bias_axes_to_reduce(spec: EinsumSpec, bias_axes):
    unknown = set(bias_axes) - set(spec.out[1:])
    if unknown:
        raise UnsupportedEquation(f"bias axes {bias_axes!r} not in output {spec.out!r}")
    return tuple(i for i, ch in enumerate(spec.out) if i > 0 and ch not in bias_axes)


def _bias_sq_norms(spec, g, bias_axes):
    axes = _bias_axes_to_reduce(spec, bias_axes)
    per_example = ops.sum(g, axis=axes) if axes else g
    return ops.sum(ops.square(per_example), axis=tuple(range(1, len(per_example.shape))))


def einsum_clipped_grads(equation, a, g, c, bias_axes=None, bias_shape=None):
    """`sum_i c_i * grad_i` for the kernel (and bias) of an EinsumDense.

    This is the ordinary weight gradient of the einsum with `g` rescaled per
    example: `einsum(lhs, out -> kernel)(a, c * g)`.

    Returns:
        `(kernel_grad, bias_grad)`; `bias_grad` is None without `bias_axes`
        and is reshaped to `bias_shape` when given.
    """
    spec = parse_einsum(equation, len(a.shape))
    g = ops.cast(g, "float32") * _batch_scale(c, len(g.shape))
    kernel_grad = ops.einsum(
        f"{spec.lhs},{spec.out}->{spec.kernel}", ops.cast(a, "float32"), g
    )
    bias_grad = None
    if bias_axes:
        axes = (0,) + _bias_axes_to_reduce(spec, bias_axes)
        bias_grad = ops.sum(g, axis=axes)
        if bias_shape is not None:
            bias_grad = ops.reshape(bias_grad, tuple(bias_shape))
    return kernel_grad, bias_grad


def dense_equation(input_rank: int) -> str:
    """The einsum equivalent of `Dense` (`matmul` over the last axis)."""
    if input_rank < 2:
        raise UnsupportedEquation("Dense input must have a batch axis and a feature axis")
    positions = "".join(string.ascii_lowercase[1 : input_rank - 1])  # b..., not x/y
    # Letters: batch 'a', positions 'b'.., contracted 'Y', produced 'Z'.
    return f"a{positions}Y,YZ->a{positions}Z"


def dense_sq_norms(a, g, use_bias=True, method="auto"):
    """Per-example squared gradient norm of a Dense kernel (+ bias).

    Rank 2 (`(B, d_in)`): `||a_i||^2 ||g_i||^2 (+ ||g_i||^2)`. Higher rank
    (`(B, T..., d_in)`): the Gram or the direct form, whichever is cheaper.

    Example:

    >>> a = keras.ops.array([[3.0, 4.0]])       # ||a|| = 5
    >>> g = keras.ops.array([[1.0, 0.0, 0.0]])  # ||g|| = 1
    >>> float(dense_sq_norms(a, g)[0])          # kernel 25 * 1, bias 1
    26.0
    """
    if len(a.shape) == 2 and method == "auto":  # the Gram form, without einsum
        g_sq = ops.sum(ops.square(ops.cast(g, "float32")), axis=1)
        a_sq = ops.sum(ops.square(ops.cast(a, "float32")), axis=1)
        return a_sq * g_sq + g_sq if use_bias else a_sq * g_sq
    return einsum_sq_norms(
        dense_equation(len(a.shape)), a, g, "Z" if use_bias else None, method
    )


def dense_clipped_grads(a, g, c, use_bias=True):
    """`(kernel_grad, bias_grad or None)` of `sum_i c_i * loss_i` for a Dense."""
    if len(a.shape) == 2:  # the einsum below, as one matrix product (faster eagerly)
        g = ops.cast(g, "float32") * _batch_scale(c, 2)
        kernel_grad = ops.matmul(ops.transpose(ops.cast(a, "float32")), g)
        return kernel_grad, (ops.sum(g, axis=0) if use_bias else None)
    return einsum_clipped_grads(
        dense_equation(len(a.shape)), a, g, c, "Z" if use_bias else None
    )


def _flatten_positions(ids, g):
    """ids (B, ...) -> (B, T); g (B, ..., d) -> (B, T, d)."""
    d = g.shape[-1]
    ids = ops.reshape(ids, (ops.shape(ids)[0], -1)) if len(ids.shape) != 2 else ids
    g = ops.reshape(g, (ops.shape(g)[0], -1, d)) if len(g.shape) != 3 else g
    return ids, g


def embedding_sq_norms(ids, g):
    """Per-example squared gradient norm of an Embedding table.

    Example `i`'s table gradient has row `v` equal to `sum_{t: ids_t = v} g_t`,
    so its squared norm is `sum_{t,s} [ids_t == ids_s] <g_t, g_s>`: the
    token-equality mask times the Gram matrix of `g` (`(B, T, T)` memory,
    independent of the vocabulary size; no `unique`, so shapes stay static).

    Args:
        ids: integer token ids, `(B,)` or `(B, ...)`.
        g: gradient of the summed loss w.r.t. the embedding output,
            `ids.shape + (output_dim,)`.

    Example:

    >>> ids = keras.ops.array([[2, 2, 0]])
    >>> g = keras.ops.ones((1, 3, 2))
    >>> float(embedding_sq_norms(ids, g)[0])  # row 2: (2, 2), row 0: (1, 1)
    10.0
    """
    g = ops.cast(g, "float32")
    if len(ids.shape) == 1:  # one token per example
        return ops.sum(ops.square(g), axis=-1)
    ids, g = _flatten_positions(ids, g)
    same = ops.cast(ops.equal(ids[:, :, None], ids[:, None, :]), "float32")
    gram = ops.einsum("btd,bsd->bts", g, g)
    return ops.maximum(ops.sum(same * gram, axis=(1, 2)), 0.0)


def embedding_clipped_grad(ids, g, c, input_dim):
    """Dense `(input_dim, output_dim)` table gradient of `sum_i c_i * loss_i`.

    (Dense, not IndexedSlices: the DP noise makes every row non-zero anyway.)
    """
    g = ops.cast(g, "float32") * _batch_scale(c, len(g.shape))
    d = g.shape[-1]
    flat_g = ops.reshape(g, (-1, d))
    flat_ids = ops.reshape(ops.cast(ids, "int32"), (-1,))
    return ops.segment_sum(flat_g, flat_ids, num_segments=int(input_dim))
