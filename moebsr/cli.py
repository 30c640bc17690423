"""The ``moebsr`` command: one sub-command per job (``moebsr tasks``; ``eval`` and ``profile`` plug in the same way).

Bad input (unknown task, broken task file, bad config) exits 2 with one line on stderr, not a stack trace.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Optional, Sequence


def _task_row(name: str, options: dict[str, Any]) -> list[str]:
    from .tasks import DatasetUnavailableError, create_task
    try:
        task = create_task(name, **options)
    except DatasetUnavailableError:
        return [name, "needs data_dir", "", "?", "", ""]
    if task.size_hint is not None:
        train = test = task.size_hint
    else:
        try:
            train, test = (str(task.num_examples(split)) for split in ("train", "test"))
        except DatasetUnavailableError:
            train, test = "needs data_dir", ""
    return [name, train, test, str(task.num_outputs), task.shared_dataset or "-", task.source]


def _format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def command_tasks(args: argparse.Namespace) -> int:
    """List registered tasks with their sizes (offline tasks are counted; hub tasks are not downloaded)."""
    from .tasks import discover_tasks, list_tasks
    task_dirs, options = list(args.task_dir), {}
    if args.config:
        from .config import load_config
        config = load_config(args.config, [])
        task_dirs = list(config.data.task_dirs) + task_dirs
        options = {name: dict(values) for name, values in config.data.task_options.items()}
    discover_tasks(task_dirs)
    names = list_tasks(args.pattern)
    rows = [_task_row(name, options.get(name, {})) for name in names]
    print(_format_table(["task", "train", "test", "outputs", "shared dataset", "source"], rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moebsr", description="Multitask MoE-ViT fine-tuning with BSR.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tasks = commands.add_parser("tasks", help="list registered tasks, their sizes and outputs")
    tasks.add_argument("pattern", nargs="?", default="*", help="shell-style name filter, e.g. 'mnist*'")
    tasks.add_argument("--task-dir", action="append", default=[], metavar="DIR",
                       help="extra folder of task files (repeatable; also $MOEBSR_TASK_DIRS)")
    tasks.add_argument("--config", help="a run config: its data.task_dirs and data.task_options apply")
    tasks.set_defaults(handler=command_tasks)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    from .tasks import TaskError
    try:
        return handler(args)
    except (TaskError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a bad config; config is imported only by commands that read one (it pulls in timm)
        config = sys.modules.get("moebsr.config")
        if config is None or not isinstance(error, config.ConfigError):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
