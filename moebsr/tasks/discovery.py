"""Find and import task files: the repository's ``tasks/`` folder, ``$MOEBSR_TASK_DIRS`` and folders from a config.

Each ``*.py`` file (not starting with ``_``) is imported once, under a module name derived from its path, so two
folders may both hold a ``my_task.py``. A file that fails to import raises ``TaskError`` naming the file and the
original error, and is retried at the next discovery (after the user fixed it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Sequence, Union

from .errors import TaskError

PathLike = Union[str, os.PathLike]
_IMPORTED: set[Path] = set()


def builtin_task_dir() -> Path:
    """The built-in task files: the repository's top-level ``tasks/`` in a source checkout (an editable install),
    where users drop their own too; in an installed wheel, its copy inside the package (``moebsr/_builtin_tasks``)."""
    import moebsr
    package = Path(moebsr.__file__).resolve().parent
    checkout = package.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "tasks").is_dir():
        return checkout / "tasks"
    return package / "_builtin_tasks"


def task_dirs(extra_dirs: Sequence[PathLike] = ()) -> list[Path]:
    """Folders searched, in order: built-in ``tasks/``, ``$MOEBSR_TASK_DIRS`` (``os.pathsep``-separated), extras."""
    env = [d for d in os.environ.get("MOEBSR_TASK_DIRS", "").split(os.pathsep) if d.strip()]
    folders = [builtin_task_dir()] + [Path(d).expanduser() for d in env]
    explicit = [Path(d).expanduser() for d in extra_dirs]
    for folder in [Path(d).expanduser() for d in env] + explicit:
        if not folder.is_dir():
            raise TaskError(f"task folder {str(folder)!r} does not exist (from MOEBSR_TASK_DIRS or data.task_dirs)")
    unique: list[Path] = []
    for folder in folders + explicit:
        folder = folder.resolve()
        if folder.is_dir() and folder not in unique:
            unique.append(folder)
    return unique


def _module_name(path: Path) -> str:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = "".join(c if c.isalnum() else "_" for c in path.stem)
    return f"moebsr_task_file_{stem}_{digest}"


def import_task_file(path: PathLike) -> None:
    """Import one task file (its ``@register_task`` decorators run); a no-op if it was imported already."""
    path = Path(path).resolve()
    if path in _IMPORTED:
        return
    name = _module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TaskError(f"task file {path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except TaskError as error:
        sys.modules.pop(name, None)
        raise TaskError(f"task file {path}: {error}") from error
    except Exception as error:
        sys.modules.pop(name, None)
        raise TaskError(f"task file {path} failed to import: {type(error).__name__}: {error}") from error
    _IMPORTED.add(path)


def discover_tasks(extra_dirs: Sequence[PathLike] = ()) -> list[Path]:
    """Import every task file in :func:`task_dirs`; returns the files imported so far from those folders."""
    files = []
    for folder in task_dirs(extra_dirs):
        for path in sorted(folder.glob("*.py")):
            if not path.name.startswith("_"):
                import_task_file(path)
                files.append(path.resolve())
    return files
