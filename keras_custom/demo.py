"""A tour of keras_custom in one run: train, log, clip, save, reload, plot.

    python -m keras_custom.demo              # or: keras-custom-demo
    python -m keras_custom.demo --epochs 5 --output /tmp/kc_demo

Trains a small network on scikit-learn's bundled handwritten digits (no download)
with a stack of hooks, shows Keras's progress bar with what the hooks log, saves the
model to a `.keras` file, reloads it and checks that its predictions are identical,
and draws the training curves to a PNG.
"""

import argparse
import dataclasses
import pathlib
import sys
import time

from keras_custom import _quiet

MAX_NORM = 0.5  # the ClipByGlobalNorm threshold of the demo

_EPILOG = """\
backend:
  Keras picks its backend from the KERAS_BACKEND environment variable
  (tensorflow by default; jax and torch also work), for example:
      KERAS_BACKEND=jax python -m keras_custom.demo

outputs (in --output):
  model.keras          the trained model, hooks and optimizer state included
  history.csv          every logged value per epoch (Keras's CSVLogger)
  training_curves.png  loss, accuracy, gradient norm before/after clipping, ...
"""


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an integer >= 1. Received: {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1. Received: {value}")
    return value


def _seed(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an integer in [0, 2**32). Received: {text!r}"
        ) from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(
            f"must be an integer in [0, 2**32). Received: {value}"
        )
    return value


def build_parser():
    """The command-line interface of the demo."""
    parser = argparse.ArgumentParser(
        prog="keras-custom-demo",
        description=(
            "Train a small network on scikit-learn's digits with keras_custom hooks "
            "(weight penalty, gradient clipping with the norm logged before and after, "
            "learning-rate logging), save it to .keras, reload it, check the "
            "predictions are identical, and plot the training curves."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--epochs",
        type=_positive_int,
        default=20,
        help="number of epochs (an integer >= 1; default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        help="batch size (default: %(default)s)",
    )
    parser.add_argument(
        "--output",
        type=pathlib.Path,
        default=pathlib.Path("demo_output"),
        help="folder for the model, the history and the plot; created if missing "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="random seed for the data split, the weights and the shuffling "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=1,
        help="Keras's fit verbosity: 0 silent, 1 progress bar, 2 one line per epoch "
        "(default: %(default)s)",
    )
    return parser


@dataclasses.dataclass
class Result:
    """What a demo run produced."""

    model: object
    history: dict
    test_accuracy: float
    reload_identical: bool
    model_path: pathlib.Path
    history_path: pathlib.Path
    plot_path: pathlib.Path
    x_test: object


def load_data(seed):
    """The digits, scaled to [0, 1], split 60/20/20 into train/validation/test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_train, y_train, test_size=0.25, random_state=seed, stratify=y_train
    )
    return (x_train, y_train), (x_val, y_val), (x_test, y_test)


def make_hooks():
    """The hook stack of the demo, in the order the hooks run."""
    from keras_custom import hooks

    stack = [hooks.WeightPenalty(l2=1e-4)]  # a loss term, logged as weight_penalty
    skip = getattr(hooks, "SkipNonFinite", None)
    if skip is not None:
        stack.append(skip())  # a NaN/Inf batch changes nothing; logs skipped_steps
    stack += [
        hooks.LogGradNorm(name="grad_norm_raw"),  # the gradient as the tape gave it
        hooks.ClipByGlobalNorm(MAX_NORM),
        hooks.LogGradNorm(name="grad_norm"),  # the gradient the optimizer receives
        hooks.LogLearningRate(),  # the schedule's value at each step
    ]
    return stack


def make_model(steps, seed):
    """A small MLP compiled with the demo's hooks and a cosine learning-rate decay."""
    import keras

    import keras_custom as kc

    keras.utils.set_random_seed(seed)
    model = kc.Sequential(
        [
            keras.Input((64,), name="pixels"),
            keras.layers.Dense(64, activation="relu", name="hidden"),
            keras.layers.Dense(10, activation="softmax", name="digit"),
        ],
        name="digits_mlp",
    )
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=3e-3, decay_steps=steps, alpha=0.1
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        hooks=make_hooks(),
    )
    return model


def plot_history(history, path, max_norm=MAX_NORM):
    """Draws the training curves of `history` (a `History.history` dict) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = range(1, len(history["loss"]) + 1)
    panels = [
        ("loss (weight penalty included)", ["loss", "val_loss"]),
        ("accuracy", ["accuracy", "val_accuracy"]),
        ("global gradient norm (epoch mean)", ["grad_norm_raw", "grad_norm"]),
        ("learning rate", ["learning_rate"]),
    ]
    if "skipped_steps" in history:
        panels.append(("skipped steps per epoch", ["skipped_steps"]))
    labels = {
        "grad_norm_raw": "before clipping (grad_norm_raw)",
        "grad_norm": "after clipping (grad_norm)",
    }
    ncols = 2
    nrows = (len(panels) + 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(10, 3.6 * nrows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            if key in history:
                ax.plot(epochs, history[key], marker=".", label=labels.get(key, key))
        if keys[0] == "grad_norm_raw":
            ax.axhline(
                max_norm,
                color="grey",
                linestyle="--",
                linewidth=1,
                label=f"max_norm = {max_norm:g}",
            )
        if keys == ["skipped_steps"]:  # a count: from 0, whole numbers
            ax.set_ylim(0, max(1.0, max(history["skipped_steps"])) * 1.1)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("keras_custom demo: digits, hooks logged per epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(epochs=20, output="demo_output", seed=0, batch_size=32, verbose=1):
    """Trains, saves, reloads and plots; returns a `Result`.

    Args:
        epochs: number of epochs.
        output: folder for `model.keras`, `history.csv` and `training_curves.png`.
        seed: random seed of the split, the weights and the shuffling.
        batch_size: batch size.
        verbose: `fit`'s verbosity.

    Returns:
        A `Result` with the model, its history and the paths written.
    """
    import keras
    import numpy as np

    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = load_data(seed)
    steps = epochs * -(-len(x_train) // batch_size)
    model = make_model(steps, seed)
    history_path = output / "history.csv"
    history = model.fit(
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        epochs=epochs,
        batch_size=batch_size,
        callbacks=[keras.callbacks.CSVLogger(str(history_path))],
        verbose=verbose,
    ).history
    _, test_accuracy = model.evaluate(x_test, y_test, verbose=0)[:2]

    model_path = output / "model.keras"
    model.save(model_path)
    restored = keras.models.load_model(model_path)  # no custom_objects needed
    before = model.predict(x_test, verbose=0)
    after = restored.predict(x_test, verbose=0)
    identical = bool(np.array_equal(before, after))

    plot_path = plot_history(history, output / "training_curves.png")
    return Result(
        model=model,
        history=history,
        test_accuracy=float(test_accuracy),
        reload_identical=identical,
        model_path=model_path,
        history_path=history_path,
        plot_path=plot_path,
        x_test=x_test,
    )


def main(argv=None):
    """Entry point of `python -m keras_custom.demo` and `keras-custom-demo`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output.exists() and not args.output.is_dir():
        parser.error(
            f"argument --output: must be a folder (it is created if missing). "
            f"Received: {str(args.output)!r}, which is a file"
        )

    start = time.time()
    _quiet.quiet_startup()  # a no-op when the package already did it
    import keras

    print(f"keras {keras.__version__}, backend {keras.backend.backend()}")
    result = run(
        epochs=args.epochs,
        output=args.output,
        seed=args.seed,
        batch_size=args.batch_size,
        verbose=args.verbose,
    )
    history = result.history
    print()
    print("Hooks, in the order they run:")
    for hook in result.model.hooks:
        print(f"  {hook!r}")
    print()
    print(
        f"After {args.epochs} epochs: loss {history['loss'][-1]:.4f}, "
        f"val_loss {history['val_loss'][-1]:.4f}, "
        f"test accuracy {result.test_accuracy:.3f}"
    )
    print(
        f"Gradient norm, last epoch mean: {history['grad_norm_raw'][-1]:.4f} before "
        f"clipping, {history['grad_norm'][-1]:.4f} after (max_norm={MAX_NORM:g})"
    )
    if "skipped_steps" in history:
        print(f"Skipped steps: {sum(history['skipped_steps']):g}")
    print(
        "Reloaded model: predictions "
        + ("identical" if result.reload_identical else "DIFFERENT")
        + " to the trained model's"
    )
    print()
    print(f"Model:   {result.model_path.resolve()}")
    print(f"History: {result.history_path.resolve()}")
    print(f"Plot:    {result.plot_path.resolve()}")
    print(f"Done in {time.time() - start:.0f} s.")
    if not result.reload_identical:
        print(
            "error: the reloaded model's predictions differ from the trained model's",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
