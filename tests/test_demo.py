"""The demo: `python -m keras_custom.demo` / `keras-custom-demo`."""

import csv
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the demo's extra is not installed")
pytest.importorskip("matplotlib", reason="the demo's extra is not installed")

from keras_custom import demo  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_saves_reloads_identically_and_plots(tmp_path):
    result = demo.run(epochs=2, output=tmp_path, seed=1, verbose=0)

    assert result.model_path == tmp_path / "model.keras"
    assert result.reload_identical is True
    # Reload independently of the demo and compare predictions bit for bit.
    restored = keras.models.load_model(result.model_path)
    np.testing.assert_array_equal(
        restored.predict(result.x_test, verbose=0),
        result.model.predict(result.x_test, verbose=0),
    )
    assert [type(h).__name__ for h in restored.hooks] == [
        type(h).__name__ for h in result.model.hooks
    ]
    assert [h.name for h in restored.hooks if type(h).__name__ == "LogGradNorm"] == [
        "grad_norm_raw",
        "grad_norm",
    ]

    history = result.history
    for key in ("loss", "val_loss", "grad_norm_raw", "grad_norm", "learning_rate"):
        assert len(history[key]) == 2, key
        assert np.all(np.isfinite(history[key])), key
    # Epoch means of the clipped norm respect the threshold; clipping only lowers.
    assert max(history["grad_norm"]) <= demo.MAX_NORM + 1e-5
    assert np.all(np.array(history["grad_norm"]) <= np.array(history["grad_norm_raw"]))
    # The cosine schedule decays: the learning rate falls from epoch to epoch.
    assert history["learning_rate"][1] < history["learning_rate"][0]

    rows = _read_csv(result.history_path)
    assert len(rows) == 2
    assert {"grad_norm_raw", "grad_norm", "weight_penalty", "val_loss"} <= set(rows[0])
    png = result.plot_path.read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_main_prints_where_everything_went(tmp_path, capsys):
    out = tmp_path / "out"  # created by the demo
    code = demo.main(["--epochs", "1", "--output", str(out), "--verbose", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("model.keras", "history.csv", "training_curves.png"):
        assert (out / name).is_file(), name
        assert str((out / name).resolve()) in printed
    assert "predictions identical" in printed
    assert "grad_norm_raw" in printed  # the hook stack is listed


def test_plot_shows_skipped_steps_when_logged(tmp_path):
    history = {
        "loss": [2.0, 1.0, 0.5],
        "val_loss": [2.1, 1.2, 0.7],
        "accuracy": [0.3, 0.6, 0.8],
        "val_accuracy": [0.3, 0.5, 0.7],
        "grad_norm_raw": [3.0, 1.0, 0.3],
        "grad_norm": [0.5, 0.5, 0.3],
        "learning_rate": [1e-3, 5e-4, 1e-4],
        "skipped_steps": [0.0, 2.0, 0.0],
    }
    path = demo.plot_history(history, tmp_path / "curves.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_help_documents_options_and_backend(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("--epochs", "--output", "--seed", "--batch-size", "KERAS_BACKEND"):
        assert word in text


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--epochs", "0"], "argument --epochs: must be an integer >= 1. Received: 0"),
        (["--epochs", "-3"], "argument --epochs: must be an integer >= 1. Received: -3"),
        (["--epochs", "two"], "--epochs: must be an integer >= 1. Received: 'two'"),
        (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
        (["--seed", "-1"], "argument --seed: must be an integer in [0, 2**32)"),
        (["--verbose", "3"], "argument --verbose: invalid choice: 3"),
        (["--epoch", "2", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(argv, expected, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        demo.main([*argv, "--output", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "usage: keras-custom-demo" in err
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written


def test_output_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--output", str(target)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --output: must be a folder" in err
    assert repr(str(target)) in err


def test_command_line_refuses_bad_option_quietly(tmp_path):
    """The real command: exit code 2, argparse's message, no traceback, and none of
    TensorFlow's start-up lines (the user did not set TF_CPP_MIN_LOG_LEVEL)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run(
        [sys.executable, "-m", "keras_custom.demo", "--epochs", "0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines()[-1] == (
        "keras-custom-demo: error: argument --epochs: must be an integer >= 1. "
        "Received: 0"
    )
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("usage: keras-custom-demo"), proc.stderr[:2000]
