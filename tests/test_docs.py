"""The documentation runs: every ```python block of README.md and docs/, and the
MkDocs site builds with `--strict`.

Each block runs on its own: a fresh namespace, a fresh temporary working folder
(files such as `model.keras` go there) and a cleared Keras session, in one
subprocess per page (one Keras import per page). Blocks fenced as ```text, ```bash
or anything but ```python are not run. A block that imports a backend's own
library (`import tensorflow`, `import jax`, `import torch`) runs only on that
backend. A block that imports an optional library (`import keras_hub`) runs only
where it is installed. A failing block is reported with its page and line numbers.
"""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import keras
import pytest

pytest.importorskip("mkdocs", reason="the docs extra is not installed")

ROOT = pathlib.Path(__file__).resolve().parent.parent
BACKEND = keras.backend.backend()
BACKEND_LIBRARY = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}

_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")


def code_blocks(text):
    """The fenced code blocks of a Markdown text, as `(language, first_line, code)`.

    `first_line` is the 1-based line number of the block's first code line. Only
    fences at the start of a line count (blocks indented in a list are not run).
    """
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, language = match.group(1), match.group(2).lower()
        start = i + 1
        end = start
        while end < len(lines) and not lines[end].startswith(fence):
            end += 1
        blocks.append((language, start + 1, "\n".join(lines[start:end]) + "\n"))
        i = end + 1
    return blocks


def backend_of(code):
    """The backend a block needs (it imports that backend's library), else None."""
    for backend, library in BACKEND_LIBRARY.items():
        if re.search(rf"^\s*(import|from)\s+{library}\b", code, re.MULTILINE):
            return backend
    return None


# Libraries that docs use but the package does not need: a block that imports one
# runs only where it is installed (keras-hub, in the `test` extra, needs Keras 3.15).
OPTIONAL_LIBRARIES = ("keras_hub",)


def missing_library(code):
    """The optional library a block imports that is not installed, else None."""
    for library in OPTIONAL_LIBRARIES:
        if re.search(rf"^\s*(import|from)\s+{library}\b", code, re.MULTILINE):
            if importlib.util.find_spec(library) is None:
                return library
    return None


def python_blocks(path):
    text = path.read_text(encoding="utf-8")
    return [(line, code) for lang, line, code in code_blocks(text) if lang == "python"]


def documents():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [d for d in docs if python_blocks(d)]


# Runs in a subprocess: argv[1] is a JSON list of [page, line, code], argv[2] the
# path of the JSON report it writes: one [page, line, error or None] per block.
RUNNER = r"""
import json, os, sys, tempfile, traceback
import keras

report = []
for page, line, code in json.loads(sys.argv[1]):
    keras.backend.clear_session()
    # Pad with blank lines so that tracebacks give the page's own line numbers.
    source = "\n" * (line - 1) + code
    error = None
    with tempfile.TemporaryDirectory() as cwd:
        os.chdir(cwd)
        try:
            exec(compile(source, page, "exec"), {"__name__": "__main__"})
        except BaseException:
            error = traceback.format_exc()
        finally:
            os.chdir("/")
    report.append([page, line, error])
    with open(sys.argv[2], "w") as f:
        json.dump(report, f)
"""


def test_code_blocks_parser():
    text = (
        "intro\n"
        "```python\nx = 1\n```\n"
        "```bash\npip install x\n```\n"
        "```text\nnot run\n```\n"
        "````python\nprint('```')\n````\n"
        "  ```python\n  indented = True\n  ```\n"
    )
    blocks = code_blocks(text)
    assert [(lang, line) for lang, line, _ in blocks] == [
        ("python", 3),
        ("bash", 6),
        ("text", 9),
        ("python", 12),
    ]
    assert blocks[0][2] == "x = 1\n"
    assert blocks[3][2] == "print('```')\n"
    assert backend_of("import tensorflow as tf\n") == "tensorflow"
    assert backend_of("from jax import numpy\n") == "jax"
    assert backend_of("import keras  # not tensorflow\n") is None
    absent = importlib.util.find_spec("keras_hub") is None
    assert missing_library("import keras_hub\n") == ("keras_hub" if absent else None)
    assert missing_library("import keras  # keras_hub later\n") is None


def test_readme_quick_start_is_executed():
    blocks = python_blocks(ROOT / "README.md")
    assert any("model.fit(" in code for _, code in blocks)


WORKERS = 2  # the machine's cores; each worker imports Keras once


def _blocks_to_run(page):
    relative = str(page.relative_to(ROOT))
    return [
        [relative, line, code]
        for line, code in python_blocks(page)
        if backend_of(code) in (None, BACKEND) and missing_library(code) is None
    ]


def test_runner_reports_the_failing_block_and_its_page_line(tmp_path):
    blocks = [["page.md", 3, "x = 1\n"], ["page.md", 9, "y = 2\nz = y / 0\n"]]
    report = tmp_path / "report.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-c", RUNNER, json.dumps(blocks), str(report)]
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, timeout=300)
    (_, _, ok), (page, line, error) = json.loads(report.read_text())
    assert ok is None
    assert (page, line) == ("page.md", 9)
    assert 'File "page.md", line 10' in error and "ZeroDivisionError" in error


@pytest.fixture(scope="module")
def docs_report(tmp_path_factory):
    """Runs every page's blocks, in WORKERS subprocesses; returns
    `{(page, line): error or None}` and the workers' output."""
    jobs = [[] for _ in range(WORKERS)]
    for i, page in enumerate(documents()):
        jobs[i % WORKERS].extend(_blocks_to_run(page))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", MPLBACKEND="Agg")
    tmp = tmp_path_factory.mktemp("docs")
    procs = []
    for i, blocks in enumerate(j for j in jobs if j):
        report = tmp / f"report{i}.json"
        log = open(tmp / f"log{i}.txt", "w+")
        cmd = [sys.executable, "-c", RUNNER, json.dumps(blocks), str(report)]
        procs.append(
            (
                subprocess.Popen(
                    cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT
                ),
                report,
                log,
            )
        )
    results, output = {}, []
    for proc, report, log in procs:
        try:
            proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.seek(0)
        output.append(log.read()[-4000:])
        log.close()
        if report.exists():
            for page, line, error in json.loads(report.read_text()):
                results[(page, line)] = error
    return results, "\n".join(output)


@pytest.mark.parametrize("page", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page, docs_report):
    results, output = docs_report
    blocks = _blocks_to_run(page)
    if not blocks:
        pytest.skip(
            f"every python block of {page.name} is for another backend or needs "
            "an optional library that is not installed"
        )
    failed = []
    for relative, line, _ in blocks:
        if (relative, line) not in results:
            failed.append(
                f"{relative}, block at line {line}: did not run (the "
                f"worker crashed or timed out)\n{output}"
            )
        elif results[(relative, line)] is not None:
            failed.append(
                f"{relative}, block at line {line}:\n{results[(relative, line)]}"
            )
    assert not failed, f"on the {BACKEND} backend:\n" + "\n".join(failed)


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None
    or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs and mkdocstrings are not installed (the `docs` extra)",
)
@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="the site does not depend on the backend: it is built once, in the "
    "tensorflow run",
)
def test_mkdocs_build_strict(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(tmp_path / "site"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:] + proc.stdout[-2000:]
    site = tmp_path / "site"
    for page in (
        "index.html",
        "concepts/index.html",
        "api/keras_custom.hooks/index.html",
    ):
        assert (site / page).is_file(), page
    api = (site / "api/keras_custom.hooks/index.html").read_text(encoding="utf-8")
    assert "ClipByGlobalNorm" in api and "WeightPenalty" in api


# ------------------------------------------------------------ benchmark table
def _make_table():
    spec = importlib.util.spec_from_file_location(
        "make_table", ROOT / "benchmarks" / "make_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_table_from_results(tmp_path):
    make_table = _make_table()
    results = tmp_path / "results"
    results.mkdir()
    (results / "a_tf.json").write_text(
        json.dumps(
            {
                "backend": "tensorflow",
                "keras": "3.15.1",
                "results": [
                    {"case": "keras.Model", "ms_per_step": 2.0, "overhead_pct": 0.0},
                    {
                        "case": "kc.Model + 4 hooks",
                        "ms_per_step": 2.5,
                        "overhead_pct": 25.0,
                    },
                ],
            }
        )
    )
    (results / "b_jax.json").write_text(
        json.dumps(
            [
                {
                    "backend": "jax",
                    "keras": "3.15.1",
                    "case": "keras.Model",
                    "ms_per_step": 1.0,
                    "overhead_pct": 0.0,
                    "extra": {"xla": True},
                }
            ]
        )
    )
    page = tmp_path / "page.md"
    page.write_text(
        f"# B\n\nbefore\n\n{make_table.START}\nold\n{make_table.END}\n\nafter\n"
    )
    plot = tmp_path / "img" / "plot.png"
    argv = ["--results", str(results), "--page", str(page), "--plot", str(plot)]

    assert make_table.main([*argv, "--check"]) == 1  # "old" is out of date
    assert make_table.main(argv) == 0
    text = page.read_text()
    assert text.startswith("# B\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "All rows: keras: 3.15.1." in text  # constant columns stated once
    assert "| backend | case | ms_per_step | overhead_pct | extra/xla |" in text
    assert "| tensorflow | kc.Model + 4 hooks | 2.50 | 25.0 |  |" in text
    assert "| jax | keras.Model | 1.00 | 0 | yes |" in text
    assert "![Step time per configuration](img/plot.png)" in text
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert make_table.main([*argv, "--check"]) == 0


def test_benchmark_table_without_results_and_bad_files(tmp_path, capsys):
    make_table = _make_table()
    page = tmp_path / "page.md"
    page.write_text(f"{make_table.START}\n{make_table.END}\n")
    argv = [
        "--results",
        str(tmp_path / "none"),
        "--page",
        str(page),
        "--plot",
        str(tmp_path / "p.png"),
    ]
    assert make_table.main(argv) == 0
    assert "No results yet" in page.read_text()
    assert not (tmp_path / "p.png").exists()

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.json").write_text("{not json")
    with pytest.raises(SystemExit) as exit_info:
        make_table.main(["--results", str(bad), "--page", str(page)])
    assert exit_info.value.code == 1
    assert "x.json: not valid JSON" in capsys.readouterr().err
    (bad / "x.json").write_text("[1, 2]")
    with pytest.raises(make_table.ResultsError, match="row 0 is a int"):
        make_table.load_results(bad)


def test_benchmark_page_is_up_to_date_with_results():
    """docs/benchmarks.md shows what benchmarks/results/*.json hold."""
    make_table = _make_table()
    assert make_table.main(["--check"]) == 0, (
        "docs/benchmarks.md is out of date: run python benchmarks/make_table.py"
    )
