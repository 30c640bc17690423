"""Which exceptions mean bad input (printed as one line, exit code 2) rather than a bug (a stack trace)."""

from __future__ import annotations

import sys

# Looked up only in modules already imported, so that a light command (``moebsr tasks``) does not pay for
# importing timm and accelerate just to know these classes: an error of a class never imported cannot occur.
_USER_ERROR_CLASSES = {
    "moebsr.tasks.errors": ("TaskError",),
    "moebsr.config": ("ConfigError",),
    "moebsr.checkpoint": ("CheckpointError",),
    "moebsr.run_folder": ("RunFolderError",),
    "moebsr.train": ("TrainingAborted",),
    "moebsr.model.tutel_backend": ("TutelBackendError",),
    "moebsr.deploy.bundle": ("ExportError",),
    "moebsr.model.errors": ("UnsupportedModelError",),
    "moebsr.planning.budget": ("PlanError",),
}


def is_user_error(error: BaseException) -> bool:
    classes = [getattr(sys.modules[module], name) for module, names in _USER_ERROR_CLASSES.items()
               if module in sys.modules for name in names]
    return isinstance(error, (FileNotFoundError, *classes))


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none), for one-line refusals."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
