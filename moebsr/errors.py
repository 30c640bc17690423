"""Which exceptions mean bad input (printed as one line, exit code 2) rather than a bug (a stack trace), and the
one for a feature whose optional dependencies (an install extra) are missing."""

from __future__ import annotations

import importlib.util
import sys

# Looked up only in modules already imported, so that a light command (``moebsr tasks``) does not pay for
# importing timm and accelerate just to know these classes: an error of a class never imported cannot occur.
_USER_ERROR_CLASSES = {
    "moebsr.tasks.errors": ("TaskError",),
    "moebsr.config": ("ConfigError",),
    "moebsr.training.checkpoint": ("CheckpointError",),
    "moebsr.training.run_folder": ("RunFolderError",),
    "moebsr.training.loop": ("TrainingAborted",),
    "moebsr.model.tutel_install": ("TutelBackendError",),
    "moebsr.deploy.bundle": ("ExportError",),
    "moebsr.model.errors": ("UnsupportedModelError",),
    "moebsr.planning.budget": ("PlanError",),
}


def is_user_error(error: BaseException) -> bool:
    classes = [getattr(sys.modules[module], name) for module, names in _USER_ERROR_CLASSES.items()
               if module in sys.modules for name in names]
    return isinstance(error, (FileNotFoundError, MissingExtraError, *classes))


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none), for one-line refusals."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class MissingExtraError(RuntimeError):
    """A feature needs a package of an install extra that is not installed; the message names the extra."""


def require_extra(extra: str, needed_for: str, *modules: str, otherwise: str = "") -> None:
    """Refuse ``needed_for`` in one line when any of ``modules`` cannot be imported, naming the extra that brings
    them and ``otherwise`` (another accepted choice); checked with ``find_spec``, before any work."""
    missing = [module for module in modules if not importable(module)]
    if missing:
        raise MissingExtraError(f"{needed_for} needs {', '.join(missing)}, not installed; accepted: "
                                f"pip install 'moebsr[{extra}]'{f', or {otherwise}' if otherwise else ''}")


def importable(module: str) -> bool:
    """Whether ``module`` can be imported (found, not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a dotted name whose parent is missing
        return False
