"""Turns benchmarks/results/*.json into the table of docs/benchmarks.md and the plot
docs/img/benchmarks.png.

    python benchmarks/make_table.py            # rewrite the table and the plot
    python benchmarks/make_table.py --check    # exit 1 if the page is out of date

The page has two generated sections, each from a folder of JSON files:

- `benchmarks/results/*.json` (written by benchmarks/step_overhead.py), between
  `<!-- benchmarks-table:start -->` and `<!-- benchmarks-table:end -->`, plotted
  to docs/img/benchmarks.png;
- `benchmarks/results/privacy/*.json` (written by benchmarks/privacy.py), between
  `<!-- privacy-table:start -->` and `<!-- privacy-table:end -->`, plotted to
  docs/img/privacy.png.

With `--results` (and `--plot`) the script makes one section, between the first
pair of markers.

The JSON files are written by the benchmark scripts. Each file holds either a
list of rows, or an object whose list of rows is under "results" (or "rows",
"runs", "measurements") and whose other plain values (backend, versions, machine,
...) apply to every row of the file, or one row. A row maps column names to plain
values; nested objects are flattened as "outer/inner". Columns whose value is the
same in every row are stated once above the table instead of repeated.

The table replaces what lies between the section's markers in the page; nothing
else of the page changes.

A column that only restates another (`hooks`, the list of hooks, is fixed by
`hook_set`, its name) is stated once per value of that column above the table
instead of in every row.
"""

import argparse
import json
import math
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "img" / "benchmarks.png"
START = "<!-- benchmarks-table:start -->"
END = "<!-- benchmarks-table:end -->"
PRIVACY_RESULTS = RESULTS / "privacy"
PRIVACY_PLOT = ROOT / "docs" / "img" / "privacy.png"
PRIVACY_START = "<!-- privacy-table:start -->"
PRIVACY_END = "<!-- privacy-table:end -->"
# (results folder, plot, start marker, end marker, plot title)
SECTIONS = (
    (RESULTS, PLOT, START, END, "keras_custom: cost of hooks per training step"),
    (
        PRIVACY_RESULTS,
        PRIVACY_PLOT,
        PRIVACY_START,
        PRIVACY_END,
        "keras_custom: cost of DifferentialPrivacy per training step",
    ),
)

ROW_LISTS = ("results", "rows", "runs", "measurements")
# Columns shown first, in this order, when present.
LEADING = (
    "backend",
    "hook_set",
    "case",
    "config",
    "configuration",
    "hooks",
    "name",
    "model",
)
# {column: key}: the column is stated once per value of `key` above the table, when
# each value of `key` has one value of the column.
DESCRIBED_BY = {"hooks": "hook_set"}
# The quantity plotted (a time per step, so that the baseline shows): the first of
# these that every row has, else the first numeric column.
PLOTTED = (
    "ms_per_step",
    "step_ms",
    "time_per_step_ms",
    "median_ms",
    "us_per_step",
    "step_us",
    "seconds_per_step",
    "s_per_step",
    "overhead_pct",
    "overhead_percent",
    "overhead",
)


class ResultsError(ValueError):
    """A results file that cannot be read as rows."""


def _is_plain(value):
    return value is None or isinstance(value, (str, int, float, bool))


def _flatten(row, prefix=""):
    out = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}/"))
        elif isinstance(value, (list, tuple)):
            if all(_is_plain(v) for v in value):
                out[name] = ", ".join(str(v) for v in value)
        else:
            out[name] = value
    return out


def rows_of(data, source="<data>"):
    """The rows of one results file's content, shared values merged in."""
    if isinstance(data, list):
        shared, rows = {}, data
    elif isinstance(data, dict):
        key = next((k for k in ROW_LISTS if isinstance(data.get(k), list)), None)
        if key is None:
            shared, rows = {}, [data]
        else:
            shared = {k: v for k, v in data.items() if k != key}
            rows = data[key]
    else:
        raise ResultsError(
            f"{source}: expected a JSON object or list, got {type(data).__name__}"
        )
    shared = _flatten({k: v for k, v in shared.items() if not isinstance(v, list)})
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ResultsError(
                f"{source}: row {i} is a {type(row).__name__}, expected an object"
            )
        out.append({**shared, **_flatten(row)})
    return out


def load_results(folder=RESULTS):
    """All rows of `folder/*.json`, files in name order (`x.json` before
    `x-logging.json`: names are compared as their `-`-separated parts)."""
    rows = []
    paths = pathlib.Path(folder).glob("*.json")
    for path in sorted(paths, key=lambda p: (p.stem.split("-"), p.name)):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ResultsError(f"{path}: not valid JSON ({error})") from None
        rows.extend(rows_of(data, source=str(path)))
    return rows


def _columns(rows):
    seen = []
    for row in rows:
        for key in row:
            if key not in seen:
                seen.append(key)
    leading = [c for c in LEADING if c in seen]
    return leading + [c for c in seen if c not in leading]


def _format(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value == 0:
            return "0"
        size = abs(value)
        if size >= 100:
            return f"{value:,.0f}"
        if size >= 10:
            return f"{value:.1f}"
        if size >= 0.01:
            return f"{value:.2f}"
        return f"{value:.2e}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def split_constant(rows):
    """`(varying columns, {column: value} of the columns equal in every row)`."""
    columns = _columns(rows)
    if len(rows) < 2:
        return columns, {}
    constant = {}
    for column in columns:
        values = {json.dumps(row.get(column), sort_keys=True) for row in rows}
        if len(values) == 1:
            constant[column] = rows[0].get(column)
    return [c for c in columns if c not in constant], constant


def _determined_by(rows, column, key):
    """Whether every value of `key` comes with one value of `column`."""
    seen = {}
    for row in rows:
        k = json.dumps(row.get(key), sort_keys=True)
        v = json.dumps(row.get(column), sort_keys=True)
        if seen.setdefault(k, v) != v:
            return False
    return True


def described_columns(rows, columns):
    """`{column: key}` of the varying columns stated once per value of `key`."""
    return {
        c: k
        for c, k in DESCRIBED_BY.items()
        if c in columns and k in columns and _determined_by(rows, c, k)
    }


def render_table(rows):
    """The Markdown of the results: a line of shared values, then the table."""
    if not rows:
        return (
            "No results yet. Run `python benchmarks/step_overhead.py`, then "
            "`python benchmarks/make_table.py`.\n"
        )
    columns, constant = split_constant(rows)
    lines = []
    if constant:
        shared = "; ".join(f"{k}: {_format(v)}" for k, v in constant.items())
        lines += [f"All rows: {shared}.", ""]
    described = described_columns(rows, columns)
    for column, key in described.items():
        pairs = {}
        for row in rows:
            pairs.setdefault(_format(row.get(key)), _format(row.get(column)))
        lines += [f"{column} by {key}:", ""]
        lines += [f"- {k}: {v}" for k, v in pairs.items()]
        lines.append("")
    columns = [c for c in columns if c not in described]
    numeric = {
        c
        for c in columns
        if all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows)
        and any(isinstance(r.get(c), (int, float)) for r in rows)
    }
    lines.append("| " + " | ".join(columns) + " |")
    lines.append(
        "| " + " | ".join("---:" if c in numeric else "---" for c in columns) + " |"
    )
    for row in rows:
        lines.append("| " + " | ".join(_format(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plotted_column(rows):
    """The numeric column the plot shows, or None."""
    if not rows:
        return None
    columns, _ = split_constant(rows)
    candidates = [c for c in PLOTTED if c in columns or c in rows[0]] + columns
    return next((c for c in candidates if all(_is_number(r.get(c)) for r in rows)), None)


def plot(rows, path=PLOT, title=SECTIONS[0][4]):
    """Draws a horizontal bar chart of the plotted column, one colour per backend.

    Each bar is labelled by the row's non-numeric columns (backend aside). Returns
    the path, or None when no column can be plotted.
    """
    column = plotted_column(rows)
    if column is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns, _ = split_constant(rows)
    # Labels: the non-numeric columns, less those that only restate another (the
    # backend's versions, the hooks of a hook set).
    described = described_columns(rows, columns)
    label_columns = [
        c
        for c in columns
        if c not in (column, "backend")
        and c not in described
        and not any(_is_number(r.get(c)) for r in rows)
        and (c in LEADING or not _determined_by(rows, c, "backend"))
    ]

    def label(i, row):
        parts = [str(row[c]) for c in label_columns if row.get(c) not in (None, "")]
        return " / ".join(parts) or f"row {i + 1}"

    names = list(dict.fromkeys(label(i, r) for i, r in enumerate(rows)))
    backends = list(dict.fromkeys(str(r.get("backend", "")) for r in rows))
    height = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.35 * len(names) * len(backends)))
    for b, backend in enumerate(backends):
        picked = [
            (names.index(label(i, r)) + b * height, r[column])
            for i, r in enumerate(rows)
            if str(r.get("backend", "")) == backend
        ]
        ys, xs = zip(*picked)
        ax.barh(ys, xs, height=height, label=backend or None)
    ax.set_yticks([i + height * (len(backends) - 1) / 2 for i in range(len(names))])
    ax.set_yticklabels(names)
    ax.invert_yaxis()
    ax.set_xlabel(column)
    ax.grid(axis="x", alpha=0.3)
    if any(backends):
        ax.legend(title="backend")
    ax.set_title(title)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def generated_block(rows, plot_path=None, page=PAGE):
    """What goes between the markers: the table, then the plot if there is one."""
    text = render_table(rows)
    if plot_path is not None:
        folder = pathlib.Path(page).resolve().parent
        relative = os.path.relpath(pathlib.Path(plot_path).resolve(), folder)
        text += f"\n![Step time per configuration]({pathlib.Path(relative).as_posix()})\n"
    return text


def replace_block(page_text, block, page=PAGE, start=START, end=END):
    """The page with the text between the markers replaced by `block`."""
    if page_text.count(start) != 1 or page_text.count(end) != 1:
        raise ValueError(
            f"{page}: expected one {start!r} and one {end!r} marker, in that order"
        )
    head, rest = page_text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{block}{end}{tail}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--results", type=pathlib.Path, help="one folder of results (default: both)"
    )
    parser.add_argument("--page", type=pathlib.Path, default=PAGE)
    parser.add_argument("--plot", type=pathlib.Path, default=PLOT)
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the page's tables differ from the results",
    )
    args = parser.parse_args(argv)
    if args.results is not None:
        sections = [(args.results, args.plot, START, END, SECTIONS[0][4])]
    else:
        sections = SECTIONS
    page_text = args.page.read_text(encoding="utf-8")
    for results, plot_path, start, end, title in sections:
        try:
            rows = load_results(results)
        except ResultsError as error:
            parser.exit(1, f"make_table: {error}\n")
        has_plot = rows and plotted_column(rows) is not None
        if args.check:
            block = generated_block(rows, plot_path if has_plot else None, args.page)
            if replace_block(page_text, block, args.page, start, end) != page_text:
                print(
                    f"{args.page} is out of date with {results}: run "
                    "python benchmarks/make_table.py",
                    file=sys.stderr,
                )
                return 1
            if has_plot and not plot_path.exists():
                print(
                    f"{plot_path} is missing: run python benchmarks/make_table.py",
                    file=sys.stderr,
                )
                return 1
            print(f"{args.page}: table up to date ({len(rows)} rows from {results})")
            continue
        drawn = plot(rows, plot_path, title) if has_plot else None
        block = generated_block(rows, drawn, args.page)
        page_text = replace_block(page_text, block, args.page, start, end)
        print(f"{args.page}: {len(rows)} rows from {results}")
        if drawn is not None:
            print(f"{drawn}: plot of {plotted_column(rows)}")
        elif rows:
            print("no numeric column to plot")
        else:
            print(f"no results in {results}: the page says so; no plot written")
    if not args.check:
        args.page.write_text(page_text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
