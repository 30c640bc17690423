"""The ``moebsr`` command: one sub-command per job (``tasks``, ``train``, ``eval``, ``tokens``, ``profile``,
``export``, ``predict``, ``plan``).

Bad input (unknown task, broken task file, bad config) exits 2 with one line on stderr, not a stack trace.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Optional, Sequence

from . import __version__
from .errors import is_user_error


def _task_row(name: str, options: dict[str, Any]) -> list[str]:
    """One table row; a task whose definition or data is broken is listed with its error, not fatal to the list."""
    from .tasks import DatasetUnavailableError, TaskError, create_task
    try:
        task = create_task(name, **options)
    except DatasetUnavailableError:
        return [name, "needs data_dir", "", "?", "", ""]
    except TaskError as error:
        return [name, "error", "", "?", "", str(error)]
    if task.size_hint is not None:
        train = test = task.size_hint
    else:
        try:
            train, test = (str(task.num_examples(split)) for split in ("train", "test"))
        except DatasetUnavailableError:
            train, test = "needs data_dir", ""
        except TaskError as error:
            return [name, "error", "", str(task.num_outputs), task.shared_dataset or "-", str(error)]
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


def command_train(args: argparse.Namespace) -> int:
    """``moebsr train`` for users who installed the package; under ``accelerate launch`` it runs on every process."""
    from .training.runner import run_training_cli
    return run_training_cli(args.config, args.overrides)


def command_eval(args: argparse.Namespace) -> int:
    """Per-task metrics of a saved run, as a table or JSON."""
    import json

    from .training.evaluate import evaluate_run
    from .training.export import format_class_names, read_run_document
    from .training.loop import format_metrics
    metrics = evaluate_run(args.run, args.task or None, args.split, args.keep_rate, args.max_examples,
                           args.batch_size, args.weights)
    class_names = {task: names for task, names in read_run_document(args.run).get("class_names", {}).items()
                   if task in metrics}
    if args.json:
        print(json.dumps({"run": args.run, "split": args.split, "keep_rate": args.keep_rate, "metrics": metrics,
                          "class_names": class_names}))
    else:
        budget = f" · keep rate {args.keep_rate}" if args.keep_rate is not None else ""
        print(format_metrics(metrics, title=f"{args.run} · {args.split}{budget}"))
        for task, names in class_names.items():
            print(f"classes of {task}: {format_class_names(names)}")
    return 0


def command_profile(args: argparse.Namespace) -> int:
    """Parameters, FLOPs, saved activations, memory and step time of one training step of a config."""
    import json

    from .analysis.profiling import format_profile, profile_config
    from .config import load_config
    peak_command = ["-m", "moebsr.cli", "profile", "--config", args.config, *args.overrides, "--peak-only", "--json"]
    if args.tasks_per_step is not None:
        peak_command += ["--tasks-per-step", str(args.tasks_per_step)]
    report = profile_config(load_config(args.config, args.overrides), steps=args.steps, warmup=args.warmup,
                            device=args.device, tasks_per_step=args.tasks_per_step, peak_only=args.peak_only,
                            cpu_peak_command=peak_command)
    print(json.dumps(report) if args.json or args.peak_only else format_profile(report))
    return 0


def command_plan(args: argparse.Namespace) -> int:
    """Which sub-layers to train (and what it will cost) for a budget, from a few batches of every task."""
    from pathlib import Path

    from .config import load_config
    from .planning import PlanError, parse_budget
    from .planning.candidates import format_candidates, plan_candidates
    from .planning.plan import format_report, run_plan
    budget = parse_budget(args.budget)  # before the config and the model: a typo costs nothing
    candidates = any(value is not None for value in (args.keep_rates, args.drop_blocks, args.expert_ranks))
    if args.validate_steps and not candidates:
        raise PlanError(f"--validate-steps: {args.validate_steps} steps of what? it compares the plans of several "
                        "candidates; accepted: --keep-rates R1 R2 ..., --drop-blocks B1,B2 ... or --expert-ranks "
                        "R1 R2 ... with it, or no --validate-steps")
    out = Path(args.out)
    config = load_config(args.config, args.overrides)
    if not candidates:
        report = run_plan(config, budget, args.batches, out, levers=args.levers, accumulate=args.accumulate)
        print(format_report(report, out))
        return 0
    report = plan_candidates(config, budget, args.batches, out, args.keep_rates, args.drop_blocks,
                             args.validate_steps, levers=args.levers, accumulate=args.accumulate,
                             expert_ranks=args.expert_ranks)
    print(format_report(report, out))
    print(format_candidates(report))
    return 0


def command_tokens(args: argparse.Namespace) -> int:
    """A PNG of the patches each token-dropping block keeps on a few test images of a task."""
    from .analysis.token_map import plot_kept_tokens
    drawn = plot_kept_tokens(args.run, args.out, args.task, args.images, args.split)
    kept = ", ".join(f"block {block} {fraction:.0%}" for block, fraction in drawn.kept_fraction.items())
    rows = ", ".join(f"#{index} {name}" for index, name in zip(drawn.examples, drawn.classes))
    fewer = f" (the split has only {len(drawn.examples)} distinct images)" if len(drawn.examples) < args.images else ""
    print(f"wrote {args.out} (patches kept: {kept}); {args.split} examples {rows}{fewer}")
    return 0


def command_export(args: argparse.Namespace) -> int:
    """One task of a run as its own model folder (pruned, ONNX on request), measured after export."""
    import json

    from .deploy import export_task, format_report
    report = export_task(args.run, args.task, args.out, prune=args.prune, criterion=args.criterion,
                         threshold=args.threshold, fmt=args.format, overwrite=args.overwrite,
                         calibration_examples=args.calibration_examples, tolerance=args.tolerance,
                         batch_size=args.batch_size, command=["moebsr", *sys.argv[1:]], heal_steps=args.heal_steps,
                         heal_lr=args.heal_lr, heal_loss=args.heal_loss)
    print(json.dumps({"out": str(report.out), "metrics": report.metrics, "export": report.section}) if args.json
          else format_report(report))
    return 0


def command_predict(args: argparse.Namespace) -> int:
    """Top classes of every task (or those asked) for image files; a bad path costs one line, the rest go on."""
    import json

    from .deploy.predict import format_predictions, predict
    report = predict(args.run, args.paths, args.task, args.top_k, args.keep_rate, args.batch_size)
    if args.json:
        print(json.dumps({"run": args.run, "tasks": report.tasks, "keep_rate": args.keep_rate,
                          "predictions": [p.to_dict() for p in report.predictions], "errors": report.errors}))
    elif report.predictions:
        print(format_predictions(report))
    for error in report.errors:
        print(f"error: {error}", file=sys.stderr)
    return 2 if report.errors else 0


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the flag, the bad value and what is accepted (exit 2), like every
    other bad input; ``--help`` still shows the usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message}\n")


def bounded(kind: Callable[[str], Any], accepted: str, check: Callable[[Any], bool]) -> Callable[[str], Any]:
    """An argparse ``type`` that refuses a value of the wrong kind or outside ``check`` in the flag's own words."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is invalid; accepted: {accepted}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{value!r} is invalid; accepted: {accepted}")
        return value
    parse.__name__ = accepted  # what argparse names when it reports the value
    return parse


POSITIVE_INT = bounded(int, "an integer >= 1", lambda value: value >= 1)
COUNT = bounded(int, "an integer >= 0", lambda value: value >= 0)
KEEP_RATE = bounded(float, "a number in (0, 1]", lambda value: 0 < value <= 1)
BLOCK_LIST = bounded(lambda text: [int(part) for part in text.split(",")],
                     "comma-separated block indices, e.g. 3,6,9", lambda value: True)  # ranges: against the depth


def add_tasks_command(commands: argparse._SubParsersAction) -> None:
    tasks = commands.add_parser("tasks", help="list registered tasks, their sizes and outputs")
    tasks.add_argument("pattern", nargs="?", default="*", help="shell-style name filter, e.g. 'mnist*'")
    tasks.add_argument("--task-dir", action="append", default=[], metavar="DIR",
                       help="extra folder of task files (repeatable; also $MOEBSR_TASK_DIRS)")
    tasks.add_argument("--config", help="a run config: its data.task_dirs and data.task_options apply")
    tasks.set_defaults(handler=command_tasks)


def add_eval_command(commands: argparse._SubParsersAction) -> None:
    evaluation = commands.add_parser("eval", help="evaluate a saved run per task")
    evaluation.add_argument("--run", required=True, help="run folder (train.output_dir of a finished or saved run)")
    evaluation.add_argument("--task", action="append", default=[], metavar="NAME", help="only this task (repeatable)")
    evaluation.add_argument("--split", default="test", help="split to evaluate (default: test)")
    evaluation.add_argument("--keep-rate", type=KEEP_RATE, default=None, help="evaluate with another token keep rate")
    evaluation.add_argument("--max-examples", type=POSITIVE_INT, default=None,
                            help="only the first N examples per task")
    evaluation.add_argument("--batch-size", type=POSITIVE_INT, default=None, help="evaluation batch size")
    evaluation.add_argument("--weights", default=None, help="a model.safetensors other than the run's own")
    evaluation.add_argument("--json", action="store_true", help="print one JSON object")
    evaluation.set_defaults(handler=command_eval)


def add_tokens_command(commands: argparse._SubParsersAction) -> None:
    tokens = commands.add_parser("tokens", help="picture of the patches each token-dropping block keeps")
    tokens.add_argument("--run", required=True, help="run folder (train.output_dir)")
    tokens.add_argument("--task", default=None, help="task whose test images to show (default: the run's first)")
    tokens.add_argument("--images", type=POSITIVE_INT, default=6, help="how many images (default: 6)")
    tokens.add_argument("--split", default="test", help="split to draw the images from (default: test)")
    tokens.add_argument("--out", required=True, help="PNG file to write")
    tokens.set_defaults(handler=command_tokens)


def add_export_command(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser("export", help="one task of a run as its own model (pruned, safetensors or ONNX)")
    export.add_argument("--run", required=True, help="training run folder (train.output_dir)")
    export.add_argument("--task", required=True, help="the task to export")
    export.add_argument("--out", required=True, help="folder to write the task model to (new, or an export)")
    export.add_argument("--prune", action="store_true",
                        help="remove the experts the task's gate sends little routing mass to (calibrated on the "
                             "task's training split)")
    export.add_argument("--criterion", default=None, help="with --prune: share (default), coverage or budget")
    export.add_argument("--threshold", type=float, default=None,
                        help="with --prune: least share of a layer's routing mass an expert needs to stay (share, "
                             "default 0.08), the mass the kept experts must cover (coverage, default 0.9), or the "
                             "fraction of all experts kept, heaviest first over the layers (budget, default 0.5)")
    export.add_argument("--calibration-examples", type=int, default=None,
                        help="with --prune: calibrate on the first N training examples (default: all)")
    export.add_argument("--heal-steps", type=int, default=0,
                        help="with --prune: fine-tune the pruned model N steps on the task's training split (what the "
                             "run trained: its BSR blocks, the kept gates, the head; default 0: no heal)")
    export.add_argument("--heal-lr", type=float, default=None,
                        help="with --heal-steps: the heal's peak LR (AdamW, cosine to 0; default: train.lr x 0.1)")
    export.add_argument("--heal-loss", default=None,
                        help="with --heal-steps: distill (default: match the unpruned task model's outputs) or task "
                             "(the task's loss on its labels)")
    export.add_argument("--format", default="safetensors",
                        help="safetensors (default) or onnx (adds model.onnx, checked in onnxruntime)")
    export.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted ONNX vs PyTorch logit difference (default 1e-4)")
    export.add_argument("--batch-size", type=int, default=None, help="batch size of calibration and evaluation")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    export.add_argument("--json", action="store_true", help="print one JSON object")
    export.set_defaults(handler=command_export)


def add_predict_command(commands: argparse._SubParsersAction) -> None:
    prediction = commands.add_parser("predict", help="a task's top classes for image files or folders")
    prediction.add_argument("--run", required=True, help="training run folder or exported task model folder")
    prediction.add_argument("--task", action="append", default=[], metavar="NAME",
                            help="only this task (repeatable; default: every task of the folder, one trunk pass)")
    prediction.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    prediction.add_argument("--top-k", type=int, default=5, help="classes shown per image (default: 5)")
    prediction.add_argument("--keep-rate", type=KEEP_RATE, default=None, help="predict with another token keep rate")
    prediction.add_argument("--batch-size", type=POSITIVE_INT, default=64, help="images per forward (default: 64)")
    prediction.add_argument("--json", action="store_true", help="print one JSON object")
    prediction.set_defaults(handler=command_predict)


def add_train_command(commands: argparse._SubParsersAction) -> None:
    training = commands.add_parser("train", help="train as configured (the same job as launch/multitask.py)")
    training.add_argument("--config", required=True, help="YAML file, e.g. configs/quickstart.yaml")
    training.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    training.set_defaults(handler=command_train)


def add_profile_command(commands: argparse._SubParsersAction) -> None:
    profile = commands.add_parser("profile", help="measure one training step of a config (no data needed)")
    profile.add_argument("--config", required=True, help="YAML file in configs/")
    profile.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    profile.add_argument("--steps", type=POSITIVE_INT, default=5, help="timed steps after warm-up (median reported)")
    profile.add_argument("--warmup", type=COUNT, default=2, help="untimed warm-up steps")
    profile.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    profile.add_argument("--tasks-per-step", type=POSITIVE_INT, default=None,
                         help="put the first N configured tasks on one shared image batch")
    profile.add_argument("--peak-only", action="store_true",
                         help="only the peak-memory reading (what the CPU child process runs)")
    profile.add_argument("--json", action="store_true", help="print one JSON object")
    profile.set_defaults(handler=command_profile)


def add_plan_command(commands: argparse._SubParsersAction) -> None:
    planning = commands.add_parser("plan", help="choose what trains for a memory or FLOPs budget, from your data")
    planning.add_argument("--config", required=True, help="YAML file in configs/")
    planning.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    planning.add_argument("--budget", required=True,
                          help="memory=600MiB, memory=0.3x, flops=2GFLOP or flops=0.4x (x: of full fine-tuning)")
    planning.add_argument("--batches", type=POSITIVE_INT, default=2, help="batches of every task to score units on")
    planning.add_argument("--levers", choices=("auto", "config"), default="auto",
                          help="auto: also plan with the setting of moe.recompute_experts, bsr.frozen_dtype and "
                               "moe.collapse_frozen that costs least (every setting for a step budget), keep the "
                               "better plan, set back levers that change nothing for it; config: the config's own")
    planning.add_argument("--accumulate", action="store_true",
                          help="memory budgets: also split the batch into 2 or 4 micro-batches with their gradients "
                               "accumulated (train.grad_accum_steps; same images per step), where it buys importance")
    planning.add_argument("--keep-rates", type=float, nargs="+", default=None, metavar="R",
                          help="plan once per token keep rate (1: no dropping), each to P.keep<R>.yaml; with "
                               "several, train each plan --validate-steps steps on a held-out share of the training "
                               "data and write the best to P.yaml (default: the config's keep rate)")
    planning.add_argument("--drop-blocks", type=BLOCK_LIST, nargs="+", default=None, metavar="B1,B2",
                          help="sets of dropping blocks to plan with, each keep rate at each (default: the config's "
                               "token_drop.blocks)")
    planning.add_argument("--expert-ranks", nargs="+", default=None, metavar="R",
                          help="plan once per expert rank: full (whole-copy experts) or r >= 1 (moe.expert_rank: "
                               "rank-r deltas of the upcycled MLP), each keep rate at each set of blocks with each "
                               "(default: the config's moe.expert_rank)")
    planning.add_argument("--validate-steps", type=POSITIVE_INT, default=None, metavar="N",
                          help="steps of each candidate's short run on held-out data (--keep-rates, --drop-blocks, "
                               "--expert-ranks)")
    planning.add_argument("--out", required=True, help="the config to write (P.plan.json, P.frontier.png beside it)")
    planning.set_defaults(handler=command_plan)


COMMANDS = (add_tasks_command, add_eval_command, add_tokens_command, add_export_command, add_predict_command,
            add_train_command, add_profile_command, add_plan_command)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="moebsr", description="Multitask MoE-ViT fine-tuning with BSR.")
    parser.add_argument("--version", action="version", version=f"moebsr {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except Exception as error:
        if not is_user_error(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
