"""The scripts of examples/ run (tiny settings): a script that does not run is a bug."""

import importlib.util
import math
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_weight_averaging_example_runs_and_plots(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    example = load("weight_averaging")
    assert example.main(["--epochs", "2", "--output", str(tmp_path / "wa.png")]) == 0
    assert (tmp_path / "wa.png").read_bytes().startswith(PNG_MAGIC)
    printed = capsys.readouterr().out
    assert "raw: last" in printed and "ema: last" in printed
    curves = example.run(epochs=1, label_noise=0.0)
    assert set(curves) == {"raw", "ema", "swa"}
    assert 0.0 <= curves["raw"][0] <= 1.0 and 0.0 <= curves["ema"][0] <= 1.0
    assert math.isnan(curves["swa"][0])  # SWA starts at a later epoch
    with pytest.raises(SystemExit):
        example.main(["--epochs", "0"])
