"""Tasks: a registry of task factories, discovered from ``tasks/*.py`` files (see ``registry`` and ``discovery``)."""

from .discovery import builtin_task_dir, discover_tasks, import_task_file, task_dirs
from .errors import DatasetUnavailableError, TaskError
from .metrics import MacroF1, Metric, TopK
from .registry import COMMON_OPTIONS, create_task, create_tasks, list_tasks, register_task, task_source, unregister_task
from .spec import SPLITS, BatchAugment, Task

__all__ = [
    "BatchAugment", "COMMON_OPTIONS", "DatasetUnavailableError", "MacroF1", "Metric", "SPLITS", "Task", "TaskError",
    "TopK", "builtin_task_dir", "create_task", "create_tasks", "discover_tasks", "import_task_file", "list_tasks",
    "register_task", "task_dirs", "task_source", "unregister_task",
]
