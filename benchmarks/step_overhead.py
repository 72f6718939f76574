"""What do hooks cost per training step, against the same math written by hand?

    KERAS_BACKEND=jax python benchmarks/step_overhead.py     # or tensorflow, torch
    python benchmarks/step_overhead.py --backends tensorflow jax torch
    python benchmarks/step_overhead.py --hooks logging       # the logging hook set

Three models with the same architecture, data and optimizer are timed on the
backend Keras runs on:

- `keras`: a plain `keras.Sequential` with no hooks (the floor);
- `hand_written`: a `keras.Sequential` whose `train_step` is written by hand for
  this backend (TensorFlow: `GradientTape`; JAX: the stateless `train_step` of the
  Keras guide "Customizing fit() with JAX"; PyTorch: autograd as in "Customizing
  fit() with PyTorch") and does what the hooks do: an L2 penalty on the kernels
  added to the loss, clipping by global norm, and the mean of the clipped
  gradient's global norm, the loss and the penalty as logged metrics;
- `keras_custom`: `kc.Sequential` with `[WeightPenalty(l2), ClipByGlobalNorm,
  LogGradNorm]`.

With `--hooks logging`, `keras_custom` also has `LogGradNorm(name="grad_norm_raw")`
before the clip and `LogWeightNorm`, `LogLearningRate`, `LogUpdateRatio` after it,
and the hand-written step logs the same quantities with Keras `Mean` metrics and
the same math: the global norm of the gradients before clipping (the one the clip
computes anyway), the global norm of the weights after the update, the learning
rate (read from the optimizer's variable), and `||w_new - w_old|| / ||w_old||`
over all trainable weights (a copy of the weights taken before the update). Both
steps' first-epoch logs are checked equal before timing.

Each is compiled with Keras's defaults for the backend (XLA on TensorFlow and
JAX, eager PyTorch) and warmed up with one epoch (tracing). Then the three run
interleaved: each repetition fits one epoch of `--steps` batches of each model in
turn (the order rotates), and the time per step of a repetition is its wall time
divided by the steps. The figure per model is the median over repetitions; the
ratios are between medians. Results go to `benchmarks/results/<backend>.json`
(`<backend>-logging.json` for the logging hook set).
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

WIDTH = 512
INPUTS = 256
OUTPUTS = 10
BATCH = 256
L2 = 1e-4
MAX_NORM = 1.0
LR = 0.01

# What each hook set logs (the hand-written step logs the same, in this order).
LOGS = {
    "core": ["loss", "weight_penalty", "grad_norm"],
    "logging": [
        "loss",
        "weight_penalty",
        "grad_norm",
        "grad_norm_raw",
        "weight_norm",
        "learning_rate",
        "update_ratio",
    ],
}
HOOKS = {
    "core": "WeightPenalty(l2), ClipByGlobalNorm, LogGradNorm",
    "logging": "WeightPenalty(l2), LogGradNorm(name=grad_norm_raw), ClipByGlobalNorm, "
    "LogGradNorm, LogWeightNorm, LogLearningRate, LogUpdateRatio",
}


def _layers(keras):
    return [
        keras.Input((INPUTS,)),
        keras.layers.Dense(WIDTH, activation="relu", name="d1"),
        keras.layers.Dense(WIDTH, activation="relu", name="d2"),
        keras.layers.Dense(OUTPUTS, name="out"),
    ]


def _hand_written_class(keras, hook_set="core"):
    """A `keras.Sequential` with the hooks' math in a hand-written `train_step`.

    `hook_set="logging"` also logs what the logging hooks log, with the same math:
    the gradients' global norm before clipping (`grad_norm_raw`), the weights'
    global norm after the update, the learning rate, and
    `||w_new - w_old|| / ||w_old||` over all trainable weights.
    """
    from keras import ops

    backend = keras.backend.backend()
    logging = hook_set == "logging"

    def norm_of(tensors):
        return ops.sqrt(sum(ops.sum(ops.square(t)) for t in tensors))

    def penalty_of(kernels):
        return L2 * sum(ops.sum(ops.square(k)) for k in kernels)

    def clip(grads):
        raw = norm_of(grads)
        factor = MAX_NORM / ops.maximum(raw, MAX_NORM)
        grads = [g * factor for g in grads]
        return grads, raw, norm_of(grads)

    def ratio_of(old, new):
        return ops.divide_no_nan(norm_of([n - o for o, n in zip(old, new)]), norm_of(old))

    def logged(loss, penalty, raw, norm, old, new, learning_rate):
        """The values the hand-written step logs; `learning_rate` is a callable,
        read only with the logging hooks on."""
        values = {"loss": loss, "weight_penalty": penalty, "grad_norm": norm}
        if logging:
            values["grad_norm_raw"] = raw
            values["weight_norm"] = norm_of(new)
            values["learning_rate"] = learning_rate()
            values["update_ratio"] = ratio_of(old, new)
        return values

    class HandWritten(keras.Sequential):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.trackers = [keras.metrics.Mean(name=n) for n in LOGS[hook_set]]

        @property
        def metrics(self):
            return list(self.trackers)

        def _kernel_indices(self):
            return [
                i for i, v in enumerate(self.trainable_variables) if "kernel" in v.path
            ]

        if backend == "tensorflow":

            def train_step(self, data):
                import tensorflow as tf

                x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
                variables = self.trainable_variables
                kernels = [variables[i] for i in self._kernel_indices()]
                with tf.GradientTape() as tape:
                    y_pred = self(x, training=True)
                    penalty = penalty_of(kernels)
                    loss = self.compute_loss(y=y, y_pred=y_pred) + penalty
                grads = tape.gradient(loss, variables)
                grads, raw, norm = clip(grads)
                old = [tf.identity(v.value) for v in variables] if logging else None
                self.optimizer.apply(grads, variables)
                new = [v.value for v in variables] if logging else None
                values = logged(
                    loss,
                    penalty,
                    raw,
                    norm,
                    old,
                    new,
                    lambda: self.optimizer.learning_rate,
                )
                for metric in self.metrics:
                    metric.update_state(values[metric.name])
                return {m.name: m.result() for m in self.metrics}

        elif backend == "torch":

            def train_step(self, data):
                import torch

                x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
                self.zero_grad()
                kernels = [self.trainable_variables[i] for i in self._kernel_indices()]
                y_pred = self(x, training=True)
                penalty = penalty_of(kernels)
                loss = self.compute_loss(y=y, y_pred=y_pred) + penalty
                loss.backward()
                weights = self.trainable_weights[:]
                grads = [v.value.grad for v in weights]
                with torch.no_grad():
                    grads, raw, norm = clip(grads)
                    old = [v.value.clone() for v in weights] if logging else None
                    self.optimizer.apply(grads, weights)
                    new = [v.value for v in weights] if logging else None
                    values = logged(
                        loss,
                        penalty,
                        raw,
                        norm,
                        old,
                        new,
                        lambda: self.optimizer.learning_rate,
                    )
                    for metric in self.metrics:
                        metric.update_state(values[metric.name])
                return {m.name: m.result() for m in self.metrics}

        else:  # jax

            def compute_loss_and_updates(self, trainable, non_trainable, x, y):
                y_pred, non_trainable = self.stateless_call(
                    trainable, non_trainable, x, training=True
                )
                penalty = penalty_of([trainable[i] for i in self._kernel_indices()])
                loss = self.compute_loss(x, y, y_pred) + penalty
                return loss, (non_trainable, penalty)

            def train_step(self, state, data):
                import jax

                trainable, non_trainable, optimizer_vars, metrics_vars = state
                x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
                grad_fn = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)
                (loss, (non_trainable, penalty)), grads = grad_fn(
                    trainable, non_trainable, x, y
                )
                grads, raw, norm = clip(grads)
                old = trainable
                trainable, optimizer_vars = self.optimizer.stateless_apply(
                    optimizer_vars, grads, trainable
                )

                def learning_rate():
                    # The learning rate is one of the optimizer's variables: read its
                    # value from the state, as the step must (not a traced constant).
                    lr = self.optimizer.learning_rate
                    variables = self.optimizer.variables
                    return optimizer_vars[
                        next(i for i, v in enumerate(variables) if v is lr)
                    ]

                values = logged(loss, penalty, raw, norm, old, trainable, learning_rate)
                logs, new_metrics_vars, start = {}, [], 0
                for metric in self.metrics:
                    end = start + len(metric.variables)
                    this = metric.stateless_update_state(
                        metrics_vars[start:end], values[metric.name]
                    )
                    logs[metric.name] = metric.stateless_result(this)
                    new_metrics_vars += this
                    start = end
                return logs, (trainable, non_trainable, optimizer_vars, new_metrics_vars)

    return HandWritten


def _hooks(hook_set):
    from keras_custom import hooks

    if hook_set == "core":
        return [
            hooks.WeightPenalty(l2=L2),
            hooks.ClipByGlobalNorm(MAX_NORM),
            hooks.LogGradNorm(),
        ]
    return [
        hooks.WeightPenalty(l2=L2),
        hooks.LogGradNorm(name="grad_norm_raw"),
        hooks.ClipByGlobalNorm(MAX_NORM),
        hooks.LogGradNorm(),
        hooks.LogWeightNorm(),
        hooks.LogLearningRate(),
        hooks.LogUpdateRatio(),
    ]


def measure(steps, repetitions, hook_set="core", seed=0):
    import keras
    import numpy as np

    import keras_custom as kc

    backend = keras.backend.backend()
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH * steps, INPUTS)).astype("float32")
    y = rng.normal(size=(BATCH * steps, OUTPUTS)).astype("float32")

    keras.utils.set_random_seed(seed)
    weights = keras.Sequential(_layers(keras)).get_weights()

    def make(case):
        if case == "keras":
            model = keras.Sequential(_layers(keras))
            extra = {}
        elif case == "hand_written":
            model = _hand_written_class(keras, hook_set)(_layers(keras))
            extra = {}
        else:
            model = kc.Sequential(_layers(keras))
            extra = {"hooks": _hooks(hook_set)}
        model.set_weights(weights)
        model.compile(keras.optimizers.SGD(LR), "mse", **extra)
        return model

    cases = ["keras", "hand_written", "keras_custom"]
    models = {case: make(case) for case in cases}

    def epoch(model):
        start = time.perf_counter()
        history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        return time.perf_counter() - start, history.history

    first_logs = {}
    for case in cases:  # warm-up: traces and compiles
        _, first_logs[case] = epoch(models[case])
    # The two hooked variants do the same math from the same weights.
    for name in LOGS[hook_set]:
        a, b = first_logs["hand_written"][name][0], first_logs["keras_custom"][name][0]
        if abs(a - b) > 1e-4 * abs(a) + 1e-8:
            raise AssertionError(f"{name}: hand-written {a} != keras_custom {b}")

    times = {case: [] for case in cases}
    for rep in range(repetitions):
        order = cases[rep % 3 :] + cases[: rep % 3]
        for case in order:
            seconds, _ = epoch(models[case])
            times[case].append(seconds / steps)

    medians = {case: statistics.median(t) for case, t in times.items()}
    rows = []
    for case in cases:
        t = sorted(times[case])
        rows.append(
            {
                "case": case,
                "ms_per_step": round(1e3 * medians[case], 3),
                "ms_q1": round(1e3 * t[len(t) // 4], 3),
                "ms_q3": round(1e3 * t[(3 * len(t)) // 4], 3),
                "vs_hand_written": round(medians[case] / medians["hand_written"], 4),
                "vs_keras": round(medians[case] / medians["keras"], 4),
            }
        )
    versions = {"keras": keras.__version__}
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend]
    versions[module] = __import__(module).__version__
    return {
        "backend": backend,
        "model": f"MLP {INPUTS}-{WIDTH}-{WIDTH}-{OUTPUTS}, batch {BATCH}, SGD, mse",
        "hook_set": hook_set,
        "hooks": HOOKS[hook_set],
        "steps_per_repetition": steps,
        "repetitions": repetitions,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "versions": versions,
        "results": rows,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=48, help="batches per repetition")
    parser.add_argument("--repetitions", type=int, default=15)
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=["tensorflow", "jax", "torch"],
        help="run each in a subprocess (default: the current KERAS_BACKEND only)",
    )
    parser.add_argument(
        "--hooks",
        choices=sorted(LOGS),
        default="core",
        help="hook set: core = WeightPenalty, ClipByGlobalNorm, LogGradNorm; logging "
        "= those plus LogGradNorm before the clip, LogWeightNorm, LogLearningRate and "
        "LogUpdateRatio (results in <backend>-logging.json)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if args.backends:
        code = 0
        for backend in args.backends:
            env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
            cmd = [sys.executable, __file__, "--steps", str(args.steps)]
            cmd += ["--repetitions", str(args.repetitions), "--hooks", args.hooks]
            cmd += ["--no-write"] if args.no_write else []
            code |= subprocess.call(cmd, env=env)
        return code
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    result = measure(args.steps, args.repetitions, args.hooks)
    print(f"[{result['backend']}] {result['model']}; hooks: {result['hooks']}")
    for row in result["results"]:
        print(
            f"  {row['case']:>13}: {row['ms_per_step']:8.3f} ms/step "
            f"(IQR {row['ms_q1']:.3f}-{row['ms_q3']:.3f})  "
            f"x{row['vs_hand_written']:.3f} hand-written, x{row['vs_keras']:.3f} keras"
        )
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        suffix = "" if args.hooks == "core" else f"-{args.hooks}"
        path = RESULTS / f"{result['backend']}{suffix}.json"
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"  wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
