"""MkDocs hook: the benchmark tables and plots, taken from the committed ``bench/results/``, never retyped.

- ``<!-- results: bench/results/NAME.md -->`` in a page is replaced by that file, as the benchmark wrote it; a
  missing file fails the build. The benchmarks write a table's notes on the line after its last row, which Markdown
  would read as one more row, so a blank line is put there. Options pick a part:
  ``lines="PREFIX"`` the lines that start with PREFIX, as a list; ``table="N"`` the N-th table (from 1) alone;
  ``rows="a, b"`` with it, only the header and the rows whose first cell is one of those (in the file's order).
  A pick that finds nothing fails the build.
- Every ``.png`` under ``bench/results/`` becomes a site file at the same path (a page in ``docs/results/`` links it
  as ``../bench/results/NAME.png``).
- ``<!-- results-plots: bench/results/GLOB.png -->`` is replaced by every plot the glob matches, in a collapsed block.
- The linear-probe results, which the benchmark writes as JSON only, are rendered as a table where a page holds
  :data:`LINEAR_PROBE_MARKER`.
"""

from __future__ import annotations

import json
import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
# run folders the benchmarks leave beside their results (git-ignored, and large)
SKIPPED_FOLDERS = {"accuracy_runs", "trunk_cache_runs", "deploy_runs"}
LINEAR_PROBE_MARKER = "<!-- linear-probe -->"
RESULTS_MARKER = re.compile(r'<!-- results: (?P<path>\S+)(?P<options>(?: \w+="[^"]*")*) -->')
PLOTS_MARKER = re.compile(r"<!-- results-plots: (?P<glob>\S+) -->")
OPTION = re.compile(r'(\w+)="([^"]*)"')
LINEAR_PROBE_FILES = ("linear_probe.json", "linear_probe_12.json")


def result_plots() -> list[Path]:
    """Every plot under ``bench/results/`` outside the benchmarks' run folders."""
    return sorted(path for path in RESULTS.rglob("*.png")
                  if not SKIPPED_FOLDERS & set(path.relative_to(RESULTS).parts))


def on_files(files: Files, config: Any) -> Files:
    for path in result_plots():
        files.append(File.generated(config, path.relative_to(ROOT).as_posix(), abs_src_path=str(path)))
    return files


def linear_probe_table() -> str:
    """Top-1 (%) of logistic regression on frozen features, class token / mean of the patch tokens."""
    rows = []
    tasks: list[str] = []
    for name in LINEAR_PROBE_FILES:
        results = json.loads((RESULTS / name).read_text(encoding="utf-8"))
        for backbone, scores in results.items():
            for task in (key.split("/")[0] for key in scores):
                if task not in tasks:
                    tasks.append(task)
            cells = [f"{100 * scores[f'{task}/cls']:.1f} / {100 * scores[f'{task}/mean']:.1f}" for task in tasks]
            label = f"`{backbone}`" if backbone != "random" else "the same network, random weights"
            rows.append(f"| `bench/results/{name}` | {label} | " + " | ".join(cells) + " |")
    header = "| file | backbone | " + " | ".join(tasks) + " |\n|---|---|" + "---|" * len(tasks)
    return header + "\n" + "\n".join(rows) + "\n"


def _tables(lines: list[str]) -> list[list[str]]:
    tables: list[list[str]] = []
    for index, line in enumerate(lines):
        if line.startswith("|"):
            if index == 0 or not lines[index - 1].startswith("|"):
                tables.append([])
            tables[-1].append(line)
    return tables


def results_markdown(path: str, options: dict[str, str] | None = None) -> str:
    """A results file's Markdown, with a blank line after every table, or the part ``options`` pick (see above)."""
    options = options or {}
    unknown = set(options) - {"lines", "table", "rows"}
    source = ROOT / path
    if unknown or not source.is_file() or RESULTS not in source.resolve().parents:
        raise PluginError(f"results marker: {path!r} {options}: accepted: a file under bench/results/, options "
                          f"lines, table, rows")
    lines = source.read_text(encoding="utf-8").splitlines()
    if "lines" in options:
        picked = [f"- {line}" for line in lines if line.startswith(options["lines"])]
    elif "table" in options:
        tables = _tables(lines)
        number = int(options["table"])
        picked = tables[number - 1] if 0 < number <= len(tables) else []
        if "rows" in options and picked:
            wanted = {name.strip() for name in options["rows"].split(",")}
            rows = [row for row in picked[2:] if row.strip("|").split("|")[0].strip().strip("`") in wanted]
            picked = picked[:2] + rows if len(rows) == len(wanted) else []
    else:
        picked = []
        for line in lines:
            if picked and picked[-1].startswith("|") and line.strip() and not line.startswith("|"):
                picked.append("")
            picked.append(line)
    if not picked:
        raise PluginError(f"results marker: {path!r} {options}: nothing (or not every row asked for) found there")
    return "\n".join(picked) + "\n"


def plots_markdown(pattern: str, page_uri: str) -> str:
    """A collapsed block of every plot ``pattern`` matches, linked relative to the page at ``page_uri``."""
    plots = [path for path in sorted(ROOT.glob(pattern)) if path in result_plots()]
    if not plots:
        raise PluginError(f"results-plots marker: no plot under bench/results/ matches {pattern!r}")
    folder = Path(page_uri).parent.as_posix()
    out = [f'??? note "`{pattern}`: {len(plots)} plots"', ""]
    for path in plots:
        link = posixpath.relpath(path.relative_to(ROOT).as_posix(), folder or ".")
        out += [f"    ![{path.name}]({link})", "", f"    *{path.relative_to(ROOT).as_posix()}*", ""]
    return "\n".join(out)


def included_plots(markdown: str) -> list[str]:
    """The plots a page shows, by a plots marker or an image link into bench/results/."""
    shown = [path.relative_to(ROOT).as_posix() for match in PLOTS_MARKER.finditer(markdown)
             for path in sorted(ROOT.glob(match["glob"]))]
    return shown + re.findall(r"\]\((?:\.\./)*(bench/results/[^)]+\.png)\)", markdown)


def included_results(markdown: str) -> list[str]:
    """The results files a page includes."""
    return [match["path"] for match in RESULTS_MARKER.finditer(markdown)]


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if LINEAR_PROBE_MARKER in markdown:
        markdown = markdown.replace(LINEAR_PROBE_MARKER, linear_probe_table())
    markdown = PLOTS_MARKER.sub(lambda match: plots_markdown(match["glob"], page.file.src_uri), markdown)
    return RESULTS_MARKER.sub(lambda match: results_markdown(match["path"], dict(OPTION.findall(match["options"]))),
                              markdown)
