"""Runs the whole test suite: once per Keras backend, each in its own process, then
each file of tests/isolated/ in a process of its own.

    python tests/run.py                      # all backends installed
    python tests/run.py --backends tensorflow
    python tests/run.py --backends jax --no-isolated tests/test_models.py

A file in tests/isolated/ named `test_<backend>_*.py` (backend: tf, jax, torch)
runs only on that backend; others run on every backend. Prints one closing line
'N passed, N failed, N skipped' over all runs and exits non-zero if any failed.

With pytest-xdist installed (the `test` extra), each backend's main run spreads
its test files over `--workers` processes (default: the machine's cores, at most
4; `--workers 1` runs in one process). A file's tests stay in one process
(`--dist loadfile`), so a module's fixtures are built once. tests/isolated/ files
always run in one process each.
"""

import argparse
import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHORT = {"tensorflow": "tf", "jax": "jax", "torch": "torch"}
MODULE = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def installed(backend):
    return importlib.util.find_spec(MODULE[backend]) is not None


def run(backend, paths, extra_env=None, workers=1):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env.update(extra_env or {})
    with tempfile.TemporaryDirectory() as tmp:
        report = pathlib.Path(tmp) / "report.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", f"--junitxml={report}", *paths]
        if workers > 1:
            cmd[4:4] = ["-n", str(workers), "--dist", "loadfile"]
        start = time.time()
        code = subprocess.call(cmd, cwd=ROOT, env=env)
        counts = {"passed": 0, "failed": 0, "skipped": 0}
        if report.exists():
            for suite in ET.parse(report).getroot().iter("testsuite"):
                tests = int(suite.get("tests", 0))
                failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
                skipped = int(suite.get("skipped", 0))
                counts["failed"] += failed
                counts["skipped"] += skipped
                counts["passed"] += tests - failed - skipped
        if code not in (0, 5) and counts["failed"] == 0:
            counts["failed"] = 1  # pytest itself failed (collection, crash)
        print(
            f"[{backend}] {' '.join(paths)}: {counts['passed']} passed, "
            f"{counts['failed']} failed, {counts['skipped']} skipped "
            f"({time.time() - start:.0f} s)",
            flush=True,
        )
        return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["tensorflow", "jax", "torch"],
        choices=["tensorflow", "jax", "torch"],
    )
    parser.add_argument("--no-isolated", action="store_true", help="skip tests/isolated/")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes per backend's main run (needs pytest-xdist; default: the "
        "machine's cores, at most 4)",
    )
    parser.add_argument(
        "paths",
        nargs="*",
        default=["tests"],
        help="what pytest runs in each backend's process (default: tests)",
    )
    args = parser.parse_args()
    workers = args.workers
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if workers > 1 and importlib.util.find_spec("xdist") is None:
        print(f"pytest-xdist is not installed: one process per run, not {workers}")
        workers = 1
    total = {"passed": 0, "failed": 0, "skipped": 0}
    # Files that tests/isolated/test_portable.py writes under each backend, shared
    # by its runs under every backend (each reads all of them).
    shared = tempfile.TemporaryDirectory()
    isolated_env = {"KC_ISOLATED": "1", "KC_PORTABLE_FILES": shared.name}
    isolated = sorted((ROOT / "tests" / "isolated").glob("test_*.py"))
    for backend in args.backends:
        if not installed(backend):
            print(f"[{backend}] not installed: FAILED (install the extra)", flush=True)
            total["failed"] += 1
            continue
        runs = [(list(args.paths), None, workers)]
        if not args.no_isolated:
            for path in isolated:
                parts = path.stem.split("_")
                if parts[1] in SHORT.values() and parts[1] != SHORT[backend]:
                    continue
                runs.append(([str(path.relative_to(ROOT))], isolated_env, 1))
        for paths, env, n in runs:
            for key, value in run(backend, paths, env, n).items():
                total[key] += value
    shared.cleanup()
    print(
        f"{total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped"
    )
    return 1 if total["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
