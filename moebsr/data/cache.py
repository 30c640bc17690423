"""On-disk cache of converted arrays, so small datasets are decoded once, not at every start.

Location: ``$MOEBSR_CACHE`` or ``~/.cache/moebsr``. Files are keyed by dataset, source version and split settings,
and written to a temporary file then renamed, so concurrent processes never read half a file.
"""

from __future__ import annotations

import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

Arrays = dict[str, np.ndarray]


def cache_dir() -> Path:
    return Path(os.environ.get("MOEBSR_CACHE") or Path.home() / ".cache" / "moebsr")


def cached_arrays(key: str, build: Callable[[], Arrays]) -> Arrays:
    """The arrays stored under ``key``, built with ``build()`` and stored on first use.

    An unreadable cache file is rebuilt; an unwritable cache folder only costs a warning (the arrays are returned).
    """
    path = cache_dir() / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as stored:
                return {name: stored[name] for name in stored.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            warnings.warn(f"moebsr cache: {path} is unreadable; rebuilding it")
    arrays = build()
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{key}.", suffix=".tmp", delete=False) as handle:
            temporary = Path(handle.name)
            np.savez(handle, **arrays)
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        warnings.warn(f"moebsr cache: could not write {path} ({error}); set MOEBSR_CACHE to a writable folder")
    return arrays
