"""The house: imports only go one way, the top level is the public face, functions fit a screen, and the core
install (no extras) trains."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from run_helpers import REPO, SHORT_RUN, subprocess_env

PACKAGE = REPO / "moebsr"
PUBLIC_FACE = {"__init__", "__main__", "cli", "config", "errors"}
SUB_PACKAGES = {"analysis", "data", "deploy", "model", "planning", "tasks", "training"}
LONGEST_FUNCTION = 80  # lines, decorators and docstring included
# the top-level modules of every install extra (pyproject.toml), hidden to stand for an install without them
EXTRAS_MODULES = ("sklearn", "mlxtend", "animal_shape_mnist", "tensorboard", "tensorboardX", "matplotlib", "onnx",
                  "onnxruntime", "onnxscript", "mkdocs", "mkdocstrings", "pytest", "ruff")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the moebsr modules it imports, at the top or inside a function (a lazy import is still a
    dependency: only the order of loading differs)."""
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, node.module] if node.module else base)
                candidates = [f"{target}.{alias.name}" for alias in node.names] + [target]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in files:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    graph[name].add(candidate)
                    break
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a path ``[a, b, ..., a]``, or ``[]``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for successor in sorted(graph[node]):
            if state.get(successor) == 1:
                return path[path.index(successor):] + [successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 60 and "moebsr.training.loop" in graph["moebsr.training.runner"]  # the graph is read
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["moebsr.model.spec"].add("moebsr.training.loop")  # spec is near the bottom: this closes a loop
    cycle = find_cycle(graph)
    assert cycle[0] == cycle[-1] and "moebsr.training.loop" in cycle and "moebsr.model.spec" in cycle


def test_the_top_level_holds_only_the_public_face_and_the_sub_packages():
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    packages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert modules == PUBLIC_FACE and packages == SUB_PACKAGES


def test_the_wheel_lists_every_package_and_ships_the_built_in_tasks():
    """pyproject.toml names the packages one by one (the built-in tasks are mapped in from ``tasks/``): a new
    sub-package missing from the list would be missing from every installed wheel."""
    import tomllib
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(setuptools["packages"]) == {"moebsr", "moebsr._builtin_tasks", *(f"moebsr.{p}" for p in SUB_PACKAGES)}
    assert setuptools["package-dir"] == {"moebsr._builtin_tasks": "tasks"}
    assert {path.stem for path in (REPO / "tasks").glob("*.py")} >= {"imagefolder", "mnist", "digits", "paper"}


def test_no_function_is_longer_than_a_screen():
    long = [f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in PACKAGE.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION]
    assert long == []


def test_the_public_api_resolves_and_the_version_is_the_packages():
    import moebsr
    from moebsr.cli import main
    for name in moebsr.__all__:
        assert getattr(moebsr, name) is not None, name
    assert callable(moebsr.train) and moebsr.train.__module__ == "moebsr.training.loop"
    with pytest.raises(AttributeError):
        moebsr.not_a_name  # noqa: B018
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    from importlib.metadata import version
    assert version("moebsr") == moebsr.__version__


def test_importing_moebsr_and_its_cli_loads_no_torch():
    """The public names are imported on first use: ``moebsr --version`` or ``moebsr tasks`` do not wait for torch."""
    code = "import sys, moebsr, moebsr.cli; print(sorted({'torch', 'timm', 'accelerate'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip() == "[]", result.stderr


def _without_extras(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter where no install extra's module can be imported (``sys.modules[name] =
    None``: ``import`` fails and ``find_spec`` says not installed, as in a core install)."""
    prelude = (f"import sys\nfor name in {EXTRAS_MODULES!r}:\n    sys.modules[name] = None\n"
               f"sys.path.insert(0, {str(REPO / 'tests')!r})\n")
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)


def _image_folder(root: Path) -> Path:
    from PIL import Image
    for label, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for index in range(8):
            Image.new("RGB", (12, 12), (120 * label, 30 * index, 0)).save(root / name / f"{index}.png")
    return root


def test_the_core_install_builds_the_model_and_trains_a_step_on_a_folder_task(tmp_path):
    """No extra installed: moebsr imports, builds its model and trains on an image folder, and no extra's module
    was loaded on the way."""
    folder = _image_folder(tmp_path / "pics")
    overrides = [*SHORT_RUN, "tasks=[imagefolder]", f"data.task_options.imagefolder.data_dir={folder}",
                 f"train.output_dir={tmp_path / 'run'}", "train.steps=1", "train.warmup_steps=0",
                 "train.batch_size=4", "train.sampler=round_robin", "logging.trackers=[none]"]
    result = _without_extras(
        "import moebsr\n"
        f"config = moebsr.load_config({str(REPO / 'configs' / 'quickstart.yaml')!r}, {overrides!r})\n"
        "result = moebsr.train(config)\n"
        f"loaded = sorted(n for n, m in sys.modules.items()\n"
        f"                if m is not None and n.split('.')[0] in {EXTRAS_MODULES!r})\n"
        "print('step', result.step, 'loaded', loaded)\n", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 1 loaded []" in result.stdout
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.parametrize("overrides, extra", [
    (["logging.trackers=[tensorboard]"], "tensorboard"),  # accelerate alone would drop the tracker with a warning
    (["tasks=[digits]", "logging.trackers=[none]"], "examples"),  # the quickstart's packaged data
])
def test_a_feature_whose_extra_is_missing_says_which_extra_in_one_line(tmp_path, overrides, extra):
    folder = _image_folder(tmp_path / "pics")
    argv = ["train", "--config", str(REPO / "configs" / "quickstart.yaml"), *SHORT_RUN, "tasks=[imagefolder]",
            f"data.task_options.imagefolder.data_dir={folder}", f"train.output_dir={tmp_path / 'run'}",
            "train.steps=1", "train.warmup_steps=0", "train.sampler=round_robin", *overrides]
    result = _without_extras(f"from moebsr.cli import main\nsys.exit(main({argv!r}))\n", tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"pip install 'moebsr[{extra}]'" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_moebsr_tokens_without_matplotlib_names_the_plots_extra(tmp_path):
    result = _without_extras("from moebsr.cli import main\n"
                             "sys.exit(main(['tokens', '--run', 'no_run', '--out', 'x.png']))\n", tmp_path)
    assert result.returncode == 2 and "pip install 'moebsr[plots]'" in result.stderr, result.stderr[-2000:]
