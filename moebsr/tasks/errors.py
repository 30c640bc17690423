"""The one exception type for bad task input, so entry points can print it as one line instead of a stack trace."""

from __future__ import annotations


class TaskError(ValueError):
    """A task is unknown, misdefined, or its data is missing or malformed; the message names the task and the problem.

    A ``ValueError`` subclass, so callers that expect ``ValueError`` for an unknown name keep working.
    """


class DatasetUnavailableError(TaskError):
    """A task's data cannot be loaded here (offline hub dataset, missing folder); the message says how to provide it."""
