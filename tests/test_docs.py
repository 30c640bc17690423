"""Generated docs stay in step with what generates them."""

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL_AND_QUICKSTART = ("bash scripts/setup.sh && .venv/bin/accelerate launch launch/multitask.py --config "
                          "configs/quickstart.yaml")


def test_the_compatibility_tables_are_generated_from_the_compatibility_tests_lists():
    """docs/compatibility.md is rendered from MODEL_FAMILIES and DATA_LAYOUTS: a family or layout added to a test
    and not to the docs (or the reverse) fails here."""
    check = subprocess.run([sys.executable, "scripts/compat_tables.py", "--check"], cwd=ROOT, capture_output=True,
                           text=True, check=False)
    assert check.returncode == 0, check.stderr


def _hook(name: str) -> ModuleType:
    """A module of docs/hooks/, loaded as mkdocs loads it."""
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", ROOT / "docs" / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The docs site, built as a user builds it: strict (a broken link, anchor, include or docstring fails)."""
    site = tmp_path_factory.mktemp("site")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300, check=False)
    if build.returncode != 0:
        print(build.stderr)
    assert build.returncode == 0, build.stderr[-4000:]
    return site


def test_the_docs_site_builds_strictly_and_offline(built_site: Path):
    for page in ("index.html", "configuration/index.html", "results/accuracy/index.html", "api/training/index.html"):
        assert (built_site / page).is_file(), page
    assert (built_site / "bench" / "results" / "compare_quickstart.png").is_file()


def _config_keys(cls: type, prefix: str = "") -> list[tuple[type, str, str]]:
    """(declaring dataclass, field name, dotted key) for every leaf field of a config dataclass, recursively."""
    found = []
    for field in dataclasses.fields(cls):
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if dataclasses.is_dataclass(default):
            found += _config_keys(type(default), f"{prefix}{field.name}.")
        else:
            found.append((cls, field.name, f"{prefix}{field.name}"))
    return found


def test_the_configuration_page_lists_every_key_with_its_docstring(built_site: Path):
    from moebsr.config import RunConfig

    page = (built_site / "configuration" / "index.html").read_text(encoding="utf-8")
    docstrings = _hook("config_reference").field_docstrings
    keys = _config_keys(RunConfig)
    assert len(keys) > 80
    missing = [key for _, _, key in keys if f"<code>{key}</code>" not in page]
    assert not missing, f"keys missing from the configuration page: {missing}"
    undocumented = [key for cls, name, key in keys if not docstrings(cls)[name].strip()]
    assert not undocumented, f"config fields without an attribute docstring: {undocumented}"
    for section in {key.split(".")[0] for _, _, key in keys if "." in key}:  # each section's docstring is there too
        assert docstrings(RunConfig)[section].strip(), section


def test_the_readme_is_a_front_door_with_the_set_up_commands_verbatim():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    ci_command, = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
                   if " -m pytest" in line]
    assert ci_command.startswith("bash scripts/setup.sh && ")
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    for command in (INSTALL_AND_QUICKSTART, ci_command):
        assert f"{command}\n" in blocks, f"README.md lacks the set-up command, alone in a bash block: {command}"
        assert command in (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")


def test_the_readme_headline_table_is_rows_of_the_committed_results():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    results = (ROOT / "bench" / "results" / "compare_quickstart.md").read_text(encoding="utf-8").splitlines()
    rows = [line for line in readme.split("## Results", 1)[1].split("\n## ", 1)[0].splitlines() if line.startswith("|")]
    assert len(rows) >= 4
    assert [row for row in rows if row not in results] == [], "a README results row is not in the results file"


def test_every_results_table_and_plot_is_shown_on_a_docs_page():
    """A benchmark's Markdown output and plots under bench/results/ each appear on a page (through the hook), so a
    result cannot be committed and never shown, nor a page include a file that is gone (the strict build checks
    that)."""
    hook = _hook("bench_results")
    pages = [path.read_text(encoding="utf-8") for path in (ROOT / "docs").rglob("*.md")]
    included = {path for page in pages for path in hook.included_results(page)}
    shown = {path for page in pages for path in hook.included_plots(page)}
    tables = {path.relative_to(ROOT).as_posix() for path in (ROOT / "bench" / "results").rglob("*.md")
              if not hook.SKIPPED_FOLDERS & set(path.parts)}
    plots = {path.relative_to(ROOT).as_posix() for path in hook.result_plots()}
    assert tables - included == set(), "results files no docs page includes"
    assert plots - shown == set(), "plots no docs page shows"


def test_the_tutel_install_line_in_the_docs_is_the_one_the_error_gives():
    from moebsr.model.tutel_install import TUTEL_INSTALL

    page = (ROOT / "docs" / "expert-parallel.md").read_text(encoding="utf-8")
    assert TUTEL_INSTALL in page
    assert TUTEL_INSTALL.removeprefix("pip ") in page.split("## Install", 1)[1].split("```")[1]
