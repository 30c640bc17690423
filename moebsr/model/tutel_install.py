"""Whether tutel (the optional expert-parallel backend, not on PyPI) can be imported, and how to install it.

Kept apart from :mod:`.tutel_backend` so that validating ``moe.backend: tutel`` in :mod:`.spec` imports neither
the backend nor torch.
"""

from __future__ import annotations

import importlib
from typing import Any

TUTEL_INSTALL = 'pip install --no-build-isolation "git+https://github.com/microsoft/tutel@v0.3.2"'


class TutelBackendError(ValueError):
    """tutel is missing, or the job cannot shard the experts as asked; the message says what to change."""


def require_tutel() -> Any:
    """tutel's ``moe`` module, or a one-line error saying how to install it."""
    try:
        return importlib.import_module("tutel.moe")
    except ImportError as error:
        raise TutelBackendError(f"moe.backend: 'tutel' is selected but tutel cannot be imported ({error}); "
                                f"accepted: torch, or install tutel first: {TUTEL_INSTALL}") from None
