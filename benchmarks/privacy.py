"""What does differentially private training cost per step, in time and memory?

    KERAS_BACKEND=jax python benchmarks/privacy.py      # or tensorflow, torch
    python benchmarks/privacy.py --backends tensorflow jax torch

Two models, batch 256, `SGD(0.01)`, sparse categorical cross-entropy from logits:

- `mlp`: the benchmark MLP 256-512-512-10 (`benchmarks/step_overhead.py`);
- `transformer`: a small transformer block on sequences of 16 tokens:
  Embedding(1000, 32), MultiHeadAttention(4 heads, key_dim 8) with a residual,
  Dense(32, relu) on every position, average pooling, Dense(10).

Each is timed as `kc.Model` three ways (same weights, same data):

- `plain`: no hooks (Keras's own step);
- `dp`: `DifferentialPrivacy(l2_norm_clip=1.0, noise_multiplier=1.0)` (every
  example's gradient norm, clipping, the noise);
- `dp_no_noise`: the same with `noise_multiplier=0.0`: the cost of the per-example
  clipping alone (drawing one Gaussian number per weight per step is not free on
  a CPU).

Time: after one warm-up epoch each (tracing and compiling; its duration is
`first_epoch_s`), the variants of a model run interleaved: each repetition fits
one epoch of `--steps` batches of each variant in turn (the order rotates), and a
repetition's time per step is its wall time over the steps. The figure is the
median over repetitions (`ms_q1`, `ms_q3`: quartiles); `vs_plain` is the ratio of
medians.

Memory: each variant also runs in a process of its own (with
`MALLOC_MMAP_THRESHOLD_=65536`, so that large buffers are returned to the system
when freed and the resident size follows what is alive): after the warm-up epoch
the peak resident size is reset (`/proc/self/clear_refs`), one epoch runs, and
`step_peak_mb` is the peak resident size during that epoch minus the resident
size before it: the memory a step needs beyond the model, the data and the
libraries. On JAX, `xla_temp_mb` is XLA's own figure for the compiled step's
temporary buffers (`memory_analysis()`), independent of the allocator.

Results go to `benchmarks/results/privacy/<backend>.json` (a folder of its own:
`benchmarks/make_table.py` reads only `benchmarks/results/*.json`).
"""

import argparse
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "privacy"

BATCH = 256
LR = 0.01
MODELS = ("mlp", "transformer")
VARIANTS = ("plain", "dp", "dp_no_noise")
DESCRIPTIONS = {
    "mlp": "MLP 256-512-512-10",
    "transformer": "Embedding(1000, 32), MHA(4x8) + residual, Dense(32), pool, "
    "Dense(10); 16 tokens",
}


def build(name, seed=0):
    import keras

    import keras_custom as kc

    keras.utils.set_random_seed(seed)
    if name == "mlp":
        inputs = keras.Input((256,))
        h = keras.layers.Dense(512, activation="relu")(inputs)
        h = keras.layers.Dense(512, activation="relu")(h)
        model = kc.Model(inputs, keras.layers.Dense(10)(h))
    else:
        inputs = keras.Input((16,), dtype="int32")
        e = keras.layers.Embedding(1000, 32)(inputs)
        a = keras.layers.MultiHeadAttention(num_heads=4, key_dim=8)(e, e)
        h = keras.layers.Dense(32, activation="relu")(e + a)
        h = keras.layers.GlobalAveragePooling1D()(h)
        model = kc.Model(inputs, keras.layers.Dense(10)(h))
    return model


def data(name, steps, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    n = BATCH * steps
    if name == "mlp":
        x = rng.normal(size=(n, 256)).astype("float32")
    else:
        x = rng.integers(0, 1000, size=(n, 16)).astype("int32")
    return x, rng.integers(0, 10, size=(n,))


def compiled(name, variant, weights=None):
    import keras

    from keras_custom import hooks

    model = build(name)
    if weights is not None:
        model.set_weights(weights)
    extra = []
    if variant == "dp":
        extra = [hooks.DifferentialPrivacy(1.0, 1.0, seed=0)]
    elif variant == "dp_no_noise":
        extra = [hooks.DifferentialPrivacy(1.0, 0.0, seed=0)]
    model.compile(
        keras.optimizers.SGD(LR),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        hooks=extra,
    )
    return model


def epoch(model, x, y):
    start = time.perf_counter()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return time.perf_counter() - start


def time_model(name, steps, repetitions):
    x, y = data(name, steps)
    weights = build(name).get_weights()
    models = {v: compiled(name, v, weights) for v in VARIANTS}
    first = {v: epoch(models[v], x, y) for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    for rep in range(repetitions):
        k = rep % len(VARIANTS)
        for v in VARIANTS[k:] + VARIANTS[:k]:
            times[v].append(epoch(models[v], x, y) / steps)
    medians = {v: statistics.median(t) for v, t in times.items()}
    rows = []
    for v in VARIANTS:
        t = sorted(times[v])
        rows.append(
            {
                "model": name,
                "variant": v,
                "ms_per_step": round(1e3 * medians[v], 3),
                "ms_q1": round(1e3 * t[len(t) // 4], 3),
                "ms_q3": round(1e3 * t[(3 * len(t)) // 4], 3),
                "vs_plain": round(medians[v] / medians["plain"], 3),
                "first_epoch_s": round(first[v], 2),
            }
        )
    return rows


def _status(key):
    text = pathlib.Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) / 1024.0


def memory_of(name, variant, steps):
    """In a process of its own: the step's peak resident memory above the steady
    state (MB), and on JAX XLA's temporary buffers of the compiled step (MB)."""
    import keras

    x, y = data(name, steps)
    model = compiled(name, variant)
    epoch(model, x, y)  # compiles
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    epoch(model, x, y)
    out = {"step_peak_mb": round(_status("VmHWM") - before, 1)}
    if keras.backend.backend() == "jax":
        import jax

        groups = model._kc_groups(training=True)
        state = tuple(
            [v.value for v in groups[key]]
            for key in ("trainable", "non_trainable", "optimizer")
        ) + ([v.value for v in groups["metrics"] + groups["extra"]],)
        batch = (x[:BATCH], y[:BATCH])
        analysis = jax.jit(model.train_step).lower(state, batch).compile()
        temp = analysis.memory_analysis().temp_size_in_bytes
        out["xla_temp_mb"] = round(temp / 2**20, 2)
    return out


def measure(steps, repetitions, models):
    import keras

    backend = keras.backend.backend()
    rows = []
    for name in models:
        print(f"[{backend}] timing {name}...", flush=True)
        model_rows = time_model(name, steps, repetitions)
        for row in model_rows:
            print(f"[{backend}] memory {name} {row['variant']}...", flush=True)
            env = dict(
                os.environ,
                KERAS_BACKEND=backend,
                TF_CPP_MIN_LOG_LEVEL="3",
                MALLOC_MMAP_THRESHOLD_="65536",
            )
            cmd = [sys.executable, __file__, "--memory", name, row["variant"]]
            cmd += ["--steps", str(steps)]
            done = subprocess.run(
                cmd, env=env, capture_output=True, text=True, check=True
            )
            row.update(json.loads(done.stdout.strip().splitlines()[-1]))
        plain = next(r for r in model_rows if r["variant"] == "plain")
        for row in model_rows:
            for key in ("step_peak_mb", "xla_temp_mb"):
                if key in row and plain.get(key):
                    row[f"{key}_vs_plain"] = round(row[key] / plain[key], 2)
        rows.extend(model_rows)
    versions = {"keras": keras.__version__}
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend]
    versions[module] = __import__(module).__version__
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "backend": backend,
        "batch": BATCH,
        "models": {m: DESCRIPTIONS[m] for m in models},
        "variants": {
            "plain": "kc.Model, no hooks",
            "dp": "DifferentialPrivacy(l2_norm_clip=1.0, noise_multiplier=1.0)",
            "dp_no_noise": "DifferentialPrivacy(l2_norm_clip=1.0, noise_multiplier=0.0)",
        },
        "steps_per_repetition": steps,
        "repetitions": repetitions,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "load_average_at_end": load,
        "versions": versions,
        "results": rows,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="batches per repetition")
    parser.add_argument("--repetitions", type=int, default=10)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=["tensorflow", "jax", "torch"],
        help="run each in a subprocess (default: the current KERAS_BACKEND only)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--memory", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.memory:
        print(json.dumps(memory_of(*args.memory, args.steps)))
        return 0
    if args.backends:
        code = 0
        for backend in args.backends:
            env = dict(os.environ, KERAS_BACKEND=backend)
            cmd = [sys.executable, __file__, "--steps", str(args.steps)]
            cmd += ["--repetitions", str(args.repetitions), "--models", *args.models]
            cmd += ["--no-write"] if args.no_write else []
            code |= subprocess.call(cmd, env=env)
        return code
    result = measure(args.steps, args.repetitions, args.models)
    for row in result["results"]:
        extra = "".join(
            f", {k} {row[k]}" for k in ("step_peak_mb", "xla_temp_mb") if k in row
        )
        print(
            f"[{result['backend']}] {row['model']:>11} {row['variant']:>11}: "
            f"{row['ms_per_step']:8.2f} ms/step (IQR {row['ms_q1']:.2f}-"
            f"{row['ms_q3']:.2f}) x{row['vs_plain']:.2f} plain{extra}"
        )
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{result['backend']}.json"
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"  wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
