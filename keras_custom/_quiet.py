"""Quiet start-up for the demo (`python -m keras_custom.demo`, `keras-custom-demo`).

The demo is run through this package, whose `__init__` imports Keras (and so
TensorFlow) before the demo's own code runs: the package calls `quiet_startup()`
first when, and only when, the process is the demo. Importing the library never
changes logging otherwise.
"""

import contextlib
import os
import sys


def is_demo_process():
    """Whether this process was started as the demo."""
    argv = getattr(sys, "orig_argv", None) or []
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1] == "keras_custom.demo":
        return True
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    return script.startswith("keras-custom-demo")


@contextlib.contextmanager
def _stderr_to_devnull():
    """Points file descriptor 2 at /dev/null (C++ logs write there directly)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet_startup():
    """Silences TensorFlow's start-up logs (CUDA probing, CPU features).

    Sets `TF_CPP_MIN_LOG_LEVEL=3` unless the user chose a level, then imports Keras
    (and its backend) with stderr pointed at /dev/null: TensorFlow prints some
    start-up lines before it reads the level (tensorflow/tensorflow#100442). Only
    that import is silenced; an import error still raises with its message, and
    every warning after it, ours included, is shown.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] != "3" or "keras" in sys.modules:
        return
    with _stderr_to_devnull():
        import keras  # noqa: F401
