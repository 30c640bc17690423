"""Task registry: ``@register_task(name)`` on a factory, ``list_tasks``, ``create_task`` (timm's model registry).

Duplicates: registering a name again from the *same* file replaces it silently (a module imported twice, a
notebook re-run); registering it from a *different* file raises ``TaskError`` naming both files, because two task
files silently fighting over one name would train on whichever was imported last.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import os
from typing import Any, Callable, Sequence

from .errors import TaskError
from .spec import Task

TaskFactory = Callable[..., Task]

_FACTORIES: dict[str, TaskFactory] = {}
_SOURCES: dict[str, str] = {}
# Task fields any task accepts as an option (from a config's data.task_options), whatever its factory's signature.
COMMON_OPTIONS = ("label_smoothing", "sampling_weight", "loss_weight", "metrics", "batch_augment", "image_column",
                  "label_column")


def _source_file(factory: Callable) -> str:
    code = getattr(factory, "__code__", None)
    return os.path.realpath(code.co_filename) if code is not None else repr(factory)


def register_task(name: str) -> Callable[[TaskFactory], TaskFactory]:
    """Decorator: register ``factory(**options) -> Task`` under ``name``.

    Raises:
        TaskError: ``name`` is already registered from another file.
    """
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise TaskError(f"register_task: invalid task name {name!r}; expected a non-empty string without spaces")

    def decorate(factory: TaskFactory) -> TaskFactory:
        source = _source_file(factory)
        if name in _FACTORIES and _SOURCES[name] != source:
            raise TaskError(f"duplicate task name {name!r}: registered by {_SOURCES[name]} and again by {source}; "
                            "rename one of them")
        _FACTORIES[name] = factory
        _SOURCES[name] = source
        return factory

    return decorate


def unregister_task(name: str) -> None:
    """Forget ``name`` (tests, interactive work); unknown names are ignored."""
    _FACTORIES.pop(name, None)
    _SOURCES.pop(name, None)


def _ensure_discovered() -> None:
    from .discovery import discover_tasks
    discover_tasks()


def list_tasks(pattern: str = "*") -> list[str]:
    """Sorted names of registered tasks matching the shell-style ``pattern`` (after discovering task files)."""
    _ensure_discovered()
    return sorted(name for name in _FACTORIES if fnmatch.fnmatchcase(name, pattern))


def task_source(name: str) -> str:
    """The file that registered ``name``."""
    _ensure_discovered()
    return _SOURCES[name] if name in _SOURCES else _unknown(name)


def _unknown(name: str) -> Any:
    known = ", ".join(sorted(_FACTORIES)) or "none (is the tasks/ folder there?)"
    raise TaskError(f"unknown task {name!r}; known tasks: {known}")


def create_task(name: str, **options: Any) -> Task:
    """Build the task registered as ``name``.

    ``options`` go to its factory, except the ``COMMON_OPTIONS`` (label_smoothing, sampling_weight, ...), which
    every task accepts and which override the factory's values.

    Raises:
        TaskError: unknown name (the message lists the known ones) or an option the factory does not take.
    """
    _ensure_discovered()
    if name not in _FACTORIES:
        _unknown(name)
    factory = _FACTORIES[name]
    common = {key: options.pop(key) for key in COMMON_OPTIONS if key in options}
    if "batch_augment" in common and isinstance(common["batch_augment"], dict):
        from .spec import BatchAugment
        common["batch_augment"] = BatchAugment(**common["batch_augment"])
    parameters = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = [key for key in options if key not in parameters and not takes_any]
    if unknown:
        accepted = [p for p in parameters if parameters[p].kind is not inspect.Parameter.VAR_KEYWORD]
        raise TaskError(f"task {name!r}: unknown option(s) {', '.join(unknown)}; accepted: "
                        f"{', '.join(accepted + list(COMMON_OPTIONS))}")
    try:
        task = factory(**options)
    except TaskError:
        raise
    except Exception as error:  # a task file with a missing field or a bug: name the task, its file, the error
        raise TaskError(f"task {name!r} (defined in {_SOURCES[name]}): its factory failed: "
                        f"{type(error).__name__}: {error}") from error
    if not isinstance(task, Task):
        raise TaskError(f"task {name!r}: its factory in {_SOURCES[name]} returned {type(task).__name__}, not a Task")
    return dataclasses.replace(task, name=name, **common)


def create_tasks(names: Sequence[str], options: dict[str, dict[str, Any]] | None = None) -> dict[str, Task]:
    """Several tasks at once, with per-task options (a config's ``data.task_options``)."""
    options = options or {}
    unused = sorted(set(options) - set(names))
    if unused:
        raise TaskError(f"task options given for {', '.join(unused)}, which are not among the tasks {list(names)}")
    return {name: create_task(name, **dict(options.get(name, {}))) for name in names}
