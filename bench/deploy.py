"""Deploying one task of the quickstart run: the multitask model, the exported task, and the pruned one, per task.

Protocol:
1. Runs. For each variant (``quickstart``: the README's quickstart as shipped; ``no_balance``: the same with
   ``moe.aux_loss_weight=0``, no load-balancing loss), a *test run* (the quickstart command, full training splits) and
   a *validation run* (the same with a 0.15 validation share of every task's training split held out). Trained once
   and cached under ``<out>/deploy_runs/``.
2. Threshold choice, on the validation run only: each task extracted, its routing mass calibrated on its training
   split, pruned at each point of a grid of criteria and thresholds, top-1 on the validation split.
   Heal choice (``--heal-steps N``, N > 0), likewise on the validation run only: each task pruned to each expert
   budget of ``HEAL_BUDGETS`` (``--criterion budget``: that share of all experts, heaviest first, so the size is
   fixed in advance) and healed N steps (``moebsr.deploy.heal``: its training split, the run's batch and
   augmentation) with each loss of ``HEAL_LOSSES`` at each LR of ``HEAL_LR_SCALES`` x the run's ``train.lr``, top-1
   on the validation split. Chosen per budget: the (loss, LR) whose worst task loses least.
3. Deployment, on the test run: per task, the multitask model, ``moebsr export`` (no pruning) and ``moebsr export
   --prune --format onnx`` at the default criterion and threshold, and with ``--heal-steps N`` ``moebsr export
   --prune --criterion budget --threshold B --heal-steps N --heal-lr LR --heal-loss L --format onnx`` at each
   budget's heal choice and at the export's defaults (``--criterion budget --heal-steps N``: budget 0.5, distill,
   0.1 x ``train.lr``), each also with ``HEAL_SEEDS`` - 1 more heal seeds, for the spread of its top-1:
   parameters, MoE-layer parameters, weights file, inference FLOPs per image, images per CPU-second (batch
   64 of test images, one thread, process time: the machine is shared, and wall time would measure the other jobs
   too) and top-1 on the test split (measured by the export on its own files), with the ONNX check's max abs
   difference and onnxruntime's images per CPU-second.
   Target (DESIGN.md): pruned within 0.5 point of the multitask model, >= 2x fewer MoE-layer parameters.

    python bench/deploy.py                  # both variants (~30 min on 2 quiet cores, most of it training 4 runs)
    python bench/deploy.py --variants quickstart --runs quickstart:test=runs/quickstart   # reuse a run
    python bench/deploy.py --jobs 2 --heal-steps 150 --runs ...   # also prune to budgets and heal (~35 min)

Writes ``<out>/deploy_quickstart.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from recipes import REPO, cached_run

TASKS = ["mnist", "mnist_parity", "digits", "animals"]
VALIDATION_FRACTION = 0.15
VARIANTS = {"quickstart": [], "no_balance": ["moe.aux_loss_weight=0"]}
GRID = [("share", t) for t in (0.02, 0.05, 0.08, 0.1, 0.12, 0.15)] + \
       [("coverage", c) for c in (0.95, 0.9, 0.8, 0.7, 0.6, 0.5)]
TARGET_POINTS, TARGET_MOE_RATIO = 0.5, 2.0
HEAL_BUDGETS = [0.5, 0.375]  # shares of all experts kept: 12 and 9 of the quickstart's 24 (2.0x and 2.7x fewer)
HEAL_LOSSES = ["distill", "task"]
HEAL_LR_SCALES = [0.1, 0.3]  # heal LR as a share of the run's train.lr
HEAL_SEEDS = 3  # the export's heal (the run's seed) and two more, on the test run
THROUGHPUT_BATCH, ROTATIONS = 64, 3


def run_overrides(variant: str, phase: str) -> list[str]:
    """The quickstart command's overrides for a variant's run (``train.output_dir`` aside)."""
    overrides = [*VARIANTS[variant], "logging.progress=false"]
    if phase == "validation":
        overrides += [f"data.task_options.{task}.validation_fraction={VALIDATION_FRACTION}" for task in TASKS]
    return overrides


def train_runs(variant: str, out: Path, given: dict[str, str]) -> dict[str, Path]:
    """The variant's test and validation runs: given ones (checked to be of this variant), else trained (cached)."""
    from recipes import BASE_CONFIG

    from moebsr.config import config_from_dict, load_config
    from moebsr.training.export import read_run_document

    runs = {}
    for phase in ("validation", "test"):
        if f"{variant}:{phase}" in given:
            folder = Path(given[f"{variant}:{phase}"])
            expected = load_config(BASE_CONFIG, [*run_overrides(variant, phase), f"train.output_dir={folder}"])
            found = config_from_dict(read_run_document(folder)["config"])
            for config in (expected, found):
                config.logging = type(config.logging)()  # logging does not change what a run trains
                if config.model.checkpoint:  # the same backbone weights, wherever the file was read from
                    config.model.checkpoint = hashlib.sha256(Path(config.model.checkpoint).read_bytes()).hexdigest()
            if found != expected:
                raise SystemExit(f"--runs {variant}:{phase}={folder}: not a run of that variant (its config differs)")
            runs[phase] = folder
            continue
        folder = out / "deploy_runs" / variant / phase
        cached_run(folder, [*run_overrides(variant, phase), f"train.output_dir={folder}", "logging.trackers=[none]"],
                   f"{variant}: {phase} run")
        runs[phase] = folder
    return runs


def calibrated_task(validation_run: Path, task: str) -> tuple:
    """The validation run's task model, ready to prune: ``(accelerator, data, task model, routing mass on the training
    split, its unpruned validation top-1, the multitask MoE-layer parameter count, the MoE blocks)``."""
    from moebsr.deploy import extract_task, measure_routing_mass
    from moebsr.deploy.exporter import task_images
    from moebsr.model.prune import moe_parameter_count
    from moebsr.training.build import image_spec_of
    from moebsr.training.evaluate import evaluate, open_run

    accelerator, model, data = open_run(str(validation_run), [task])
    network = accelerator.unwrap_model(model)
    blocks = list(network.moe_blocks)
    single = extract_task(network, task)
    mass = measure_routing_mass(single, task, task_images(data.config, task, "train", image_spec_of(network), 256))
    unpruned = evaluate(accelerator, single, data)[task]["top1"]
    return accelerator, data, single, mass, unpruned, moe_parameter_count(network, blocks), blocks


def sweep(validation_run: Path) -> dict:
    """Per task and grid point: experts kept per layer, MoE-parameter ratio, validation top-1 and its change."""
    from moebsr.deploy import choose_experts, prune_experts
    from moebsr.model.prune import moe_parameter_count
    from moebsr.training.evaluate import evaluate

    results = {}
    for task in TASKS:
        print(f"sweep {task} ...", file=sys.stderr, flush=True)
        accelerator, data, single, mass, unpruned, total, blocks = calibrated_task(validation_run, task)
        points = []
        for criterion, threshold in GRID:
            kept = {index: choose_experts(measured.share, criterion, threshold) for index, measured in mass.items()}
            pruned = prune_experts(copy.deepcopy(single), kept)
            top1 = evaluate(accelerator, pruned, data)[task]["top1"]
            points.append({"criterion": criterion, "threshold": threshold,
                           "kept": [len(kept[index]) for index in blocks],
                           "moe_ratio": total / moe_parameter_count(pruned, blocks), "top1": top1,
                           "change_points": (top1 - unpruned) * 100})
        results[task] = {"unpruned_top1": unpruned, "points": points}
    return results


def heal_sweep(validation_run: Path, heal_steps: int) -> dict:
    """Per task and (budget, loss, LR) of the heal grid: the pruned model healed ``heal_steps`` steps on the training
    split, its validation top-1 and the change against the unpruned task model."""
    import torch

    from moebsr.deploy import choose_layer_experts, heal_task_model, prune_experts
    from moebsr.model.prune import moe_parameter_count
    from moebsr.training.evaluate import evaluate

    torch.set_num_threads(1)
    results = {}
    for task in TASKS:
        print(f"heal sweep {task} ...", file=sys.stderr, flush=True)
        accelerator, data, single, mass, unpruned, total, blocks = calibrated_task(validation_run, task)
        points = []
        for budget in HEAL_BUDGETS:
            kept = choose_layer_experts({index: measured.share for index, measured in mass.items()}, "budget", budget)
            for loss, scale in itertools.product(HEAL_LOSSES, HEAL_LR_SCALES):
                healed = prune_experts(copy.deepcopy(single), kept)
                report = heal_task_model(healed, data.config, task, heal_steps, scale * data.config.train.lr,
                                         teacher=single if loss == "distill" else None)
                top1 = evaluate(accelerator, healed, data)[task]["top1"]
                points.append({"criterion": "budget", "threshold": budget, "loss": loss, "lr_scale": scale,
                               "lr": report.lr, "kept": [len(kept[index]) for index in blocks],
                               "moe_ratio": total / moe_parameter_count(healed, blocks), "top1": top1,
                               "change_points": (top1 - unpruned) * 100, "loss_first": report.loss_first,
                               "loss_last": report.loss_last})
        results[task] = {"unpruned_top1": unpruned, "points": points}
    return results


def choose_heal(heal_results: dict, budget: float) -> dict:
    """The heal choice of the module doc at ``budget``: ``{"criterion", "threshold", "loss", "lr_scale",
    "worst_change_points", "within"}``."""
    options = []
    for loss, scale in itertools.product(HEAL_LOSSES, HEAL_LR_SCALES):
        worst = min(point["change_points"] for result in heal_results.values() for point in result["points"]
                    if (point["threshold"], point["loss"], point["lr_scale"]) == (budget, loss, scale))
        options.append({"criterion": "budget", "threshold": budget, "loss": loss, "lr_scale": scale,
                        "worst_change_points": worst, "within": worst >= -TARGET_POINTS})
    return max(options, key=lambda option: option["worst_change_points"])


def choose_threshold(sweep_results: dict) -> dict:
    """The largest ``share`` threshold at which every task stays within the target on validation, and likewise
    for ``coverage`` (the smallest covered mass)."""
    chosen = {}
    for criterion in ("share", "coverage"):
        grid = [threshold for c, threshold in GRID if c == criterion]
        within = [t for t in grid if all(point["change_points"] >= -TARGET_POINTS
                                         for result in sweep_results.values() for point in result["points"]
                                         if point["criterion"] == criterion and point["threshold"] == t)]
        best = (max(within) if criterion == "share" else min(within)) if within else None
        chosen[criterion] = best
    return chosen


def images_per_cpu_second(forward, images, steps: int = 10, warmup: int = 3) -> float:
    """Images per second of this process's CPU time (one thread), median over ``steps`` forwards: on a machine
    other jobs share, wall time measures the other jobs too, CPU time mostly this one."""
    import torch

    from moebsr.analysis.profiling import timed_calls
    cpu_times = [cpu for _, cpu in timed_calls(forward, torch.device("cpu"), steps, warmup)]
    return images.shape[0] / statistics.median(cpu_times)


def torch_forward(model, images, task):
    import torch

    def forward() -> None:
        with torch.no_grad():
            model(images, task)
    return forward


def onnx_forward(path: Path, images):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"images": images.numpy()}
    return lambda: session.run(None, feed)


def healed_name(heal: dict) -> str:
    return "healed defaults" if heal.get("defaults") else f"healed {heal['threshold']:g}"


def default_heal(steps: int) -> dict:
    """What ``moebsr export --prune --criterion budget --heal-steps N`` does with nothing else given."""
    from moebsr.deploy.heal import DEFAULT_HEAL_LOSS, DEFAULT_LR_SCALE
    from moebsr.model.prune import DEFAULT_THRESHOLDS

    return {"criterion": "budget", "threshold": DEFAULT_THRESHOLDS["budget"], "loss": DEFAULT_HEAL_LOSS,
            "lr_scale": DEFAULT_LR_SCALE, "steps": steps, "defaults": True}


def deploy(test_run: Path, exports: Path, heals: Sequence[dict] = ()) -> dict:
    """Per task: the multitask model, the exported and the pruned task, and one pruned + healed task per heal choice
    (its budget, loss, LR scale and steps), side by side (see the module doc)."""
    import torch

    from moebsr.analysis.profiling import inference_flops
    from moebsr.deploy import export_task
    from moebsr.deploy.exporter import task_images
    from moebsr.training.build import image_spec_of
    from moebsr.training.export import load_exported_model

    torch.set_num_threads(1)
    multitask, config, _ = load_exported_model(test_run)
    multitask.eval()
    results = {}
    for task in TASKS:
        print(f"deploy {task} ...", file=sys.stderr, flush=True)
        exported = export_task(test_run, task, exports / f"{task}_exported", overwrite=True)
        pruned = export_task(test_run, task, exports / f"{task}_pruned", prune=True, fmt="onnx", overwrite=True)
        models = {"multitask": multitask, "exported": load_exported_model(exported.out)[0].eval(),
                  "pruned": load_exported_model(pruned.out)[0].eval()}
        reports = {"exported": exported, "pruned": pruned}
        seed_top1 = {}
        for heal in heals:
            name = healed_name(heal)
            options = dict(prune=True, criterion=heal["criterion"], threshold=heal["threshold"], overwrite=True,
                           heal_steps=heal["steps"], heal_lr=heal["lr_scale"] * config.train.lr, heal_loss=heal["loss"])
            healed = export_task(test_run, task, exports / f"{task}_{name}", fmt="onnx", **options)
            models[name] = load_exported_model(healed.out)[0].eval()
            reports[name] = healed
            seed_top1[name] = [healed.metrics["top1"]] + [
                export_task(test_run, task, exports / f"{task}_{name}_seed", heal_seed=config.train.seed + extra,
                            **options).metrics["top1"] for extra in range(1, HEAL_SEEDS)]
        images = next(task_images(config, task, "test", image_spec_of(multitask), THROUGHPUT_BATCH, THROUGHPUT_BATCH))
        speeds: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(ROTATIONS):  # in rotation, so a slow spell of the machine hits every model alike
            for name, model in models.items():
                speeds[name].append(images_per_cpu_second(torch_forward(model, images, task), images))
        rows = {}
        for name, model in models.items():
            section = reports.get(name, exported).section
            side = "multitask" if name == "multitask" else "task_model"
            rows[name] = {
                "parameters": section["parameters"][side], "moe_parameters": section["moe_parameters"][side],
                "file_bytes": section["bytes"]["multitask" if name == "multitask" else "model.safetensors"],
                "inference_flops_per_image": inference_flops(model, images, task) / images.shape[0],
                "images_per_cpu_s": statistics.median(speeds[name]),
                "top1": (section["metrics_multitask"] if name == "multitask" else reports[name].metrics)["top1"]}
        for name in ["pruned", *seed_top1]:
            report = reports[name]
            rows[name].update(kept=report.section["kept_experts"], dense_blocks=report.section["dense_blocks"],
                              onnx=report.section["onnx"], onnx_bytes=report.section["bytes"]["model.onnx"],
                              onnx_images_per_cpu_s=images_per_cpu_second(
                                  onnx_forward(report.out / "model.onnx", images), images),
                              pruning={k: v for k, v in report.section["pruning"].items() if k != "routing_mass"})
            if name in seed_top1:
                rows[name].update(heal=report.section["heal"], seed_top1=seed_top1[name])
        results[task] = rows
    return results


def format_results(results: dict) -> str:
    from moebsr.deploy.bundle import human_bytes

    lines = ["Per task: the multitask model (the run's model run for that task alone), `moebsr export` of the task, "
             "`moebsr export --prune --format onnx` at the default rule, and with `--heal-steps`, per expert budget, "
             "`moebsr export --prune --criterion budget --threshold B --heal-steps N --heal-lr LR --heal-loss L "
             "--format onnx` at the loss and LR chosen for that budget on the validation run (the heal sweep below). "
             "Top-1 on the test split, measured by the export on its own files (a healed model's: the export's heal, "
             f"at the run's seed; the verdicts add the mean and standard deviation over {HEAL_SEEDS} heal seeds); "
             "images per CPU-second: batch 64 of test images, one thread, process time (the machine is shared), "
             f"median of {ROTATIONS} rotations of 10 forwards. Target: pruned within {TARGET_POINTS} pt, >= "
             f"{TARGET_MOE_RATIO:g}x fewer MoE-layer parameters.", ""]
    for variant, result in results["variants"].items():
        rule = result["default_rule"]
        heals = result.get("heals", [])
        labels = {"pruned": "pruned", **{healed_name(heal): f"budget {heal['threshold']:g} + healed"
                                         + (", defaults" if heal.get("defaults") else "") for heal in heals}}
        healed_at = "".join(f"; budget {heal['threshold']:g} healed {heal['steps']} steps with the {heal['loss']} "
                            f"loss at lr {heal['lr_scale']:g} x train.lr"
                            + (" (the export's defaults)" if heal.get("defaults") else "") for heal in heals)
        lines += [f"### `{variant}` ({', '.join(VARIANTS[variant]) or 'configs/quickstart.yaml as shipped'}); "
                  f"pruned at {rule['criterion']} {rule['threshold']:g}{healed_at}", "",
                  "| task | model | parameters | MoE-layer params | weights file | GFLOPs/img | images/CPU-s | top-1 |",
                  "|---|---|---|---|---|---|---|---|"]
        verdicts: dict[str, list[str]] = {name: [] for name in labels}
        for task, rows in result["deploy"].items():
            for name, row in rows.items():
                label = labels[name] + f" ({'/'.join(str(len(e)) for e in row['kept'].values())} experts)" \
                    if name in labels else name
                lines.append(f"| {task} | {label} | {row['parameters']:,} | {row['moe_parameters']:,} | "
                             f"{human_bytes(row['file_bytes'])} | {row['inference_flops_per_image'] / 1e9:.4f} | "
                             f"{row['images_per_cpu_s']:.0f} | {row['top1'] * 100:.2f} |")
            multitask = rows["multitask"]
            for name in verdicts:
                change = (rows[name]["top1"] - multitask["top1"]) * 100
                ratio = multitask["moe_parameters"] / rows[name]["moe_parameters"]
                met = change >= -TARGET_POINTS and ratio >= TARGET_MOE_RATIO
                spread = ""
                if "seed_top1" in rows[name]:
                    changes = [(top1 - multitask["top1"]) * 100 for top1 in rows[name]["seed_top1"]]
                    spread = (f"; {len(changes)} heal seeds {statistics.mean(changes):+.2f} ± "
                              f"{statistics.stdev(changes):.2f} pt, worst {min(changes):+.2f}")
                verdicts[name].append(f"{task} {change:+.2f} pt at {ratio:.2f}x fewer MoE parameters "
                                      f"({'met' if met else 'missed'}{spread})")
        lines += [""]
        for name, listed in verdicts.items():
            lines += [f"{labels[name].capitalize()} vs multitask: {'; '.join(listed)}.", ""]
        for name in verdicts:
            onnx = ", ".join(f"{task} {rows[name]['onnx']['max_abs_diff']:.2g} "
                             f"({rows[name]['onnx_images_per_cpu_s']:.0f} images/CPU-s in onnxruntime)"
                             for task, rows in result["deploy"].items())
            lines += [f"ONNX ({labels[name]} model, onnxruntime vs PyTorch, max abs logit difference on 32 training "
                      f"images reaching every kept expert): {onnx}.", ""]
        lines += [f"Threshold sweep on the validation run (validation top-1 change in points vs the unpruned task "
                  f"model; MoE-layer parameter ratio; experts kept per MoE layer). Largest rule within "
                  f"{TARGET_POINTS} pt for every task: share {result['chosen']['share']}, coverage "
                  f"{result['chosen']['coverage']}.", "",
                  "| rule | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
        for position, (criterion, threshold) in enumerate(GRID):
            cells = []
            for task in TASKS:
                point = result["sweep"][task]["points"][position]
                cells.append(f"{point['change_points']:+.2f} pt, {point['moe_ratio']:.2f}x "
                             f"({'/'.join(map(str, point['kept']))})")
            lines.append(f"| {criterion} {threshold:g} | " + " | ".join(cells) + " |")
        lines.append("")
        if heals:
            chosen = "; ".join(f"budget {heal['threshold']:g}: {heal['loss']} at lr x {heal['lr_scale']:g} (worst task "
                               f"{heal['worst_change_points']:+.2f} pt)" for heal in heals if not heal.get("defaults"))
            lines += [f"Heal sweep on the validation run: pruned to a budget (share of all experts kept), then "
                      f"healed {heals[0]['steps']} steps on the training split with a loss (distill: towards the "
                      "unpruned task model; task: the labels) at an LR (x the run's train.lr); validation top-1 "
                      "change in points vs the unpruned task model, MoE-layer parameter ratio, experts kept per MoE "
                      f"layer. Chosen: {chosen}.", "",
                      "| rule | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
            for position, point in enumerate(result["heal_sweep"][TASKS[0]]["points"]):
                cells = []
                for task in TASKS:
                    cell = result["heal_sweep"][task]["points"][position]
                    cells.append(f"{cell['change_points']:+.2f} pt, {cell['moe_ratio']:.2f}x "
                                 f"({'/'.join(map(str, cell['kept']))})")
                lines.append(f"| budget {point['threshold']:g}, {point['loss']}, lr x {point['lr_scale']:g} | "
                             + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def variant_result(variant: str, out: Path, given: dict[str, str], heal_steps: int) -> dict:
    """One variant's runs, sweeps, choices and deployment (steps 1-3 of the module doc)."""
    sys.path.insert(0, str(REPO))
    from moebsr.model.prune import DEFAULT_CRITERION, DEFAULT_THRESHOLDS

    runs = train_runs(variant, out, given)
    swept = sweep(runs["validation"])
    heal_swept = heal_sweep(runs["validation"], heal_steps) if heal_steps else None
    heals = [{**choose_heal(heal_swept, budget), "steps": heal_steps} for budget in HEAL_BUDGETS] + \
        [default_heal(heal_steps)] if heal_steps else []
    with tempfile.TemporaryDirectory() as exports:
        deployed = deploy(runs["test"], Path(exports), heals)
    print(f"{variant}: done", file=sys.stderr, flush=True)
    return {"runs": {phase: str(path) for phase, path in runs.items()}, "sweep": swept,
            "chosen": choose_threshold(swept), "deploy": deployed,
            "default_rule": {"criterion": DEFAULT_CRITERION, "threshold": DEFAULT_THRESHOLDS[DEFAULT_CRITERION]},
            **({"heal_sweep": heal_swept, "heals": heals} if heals else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--runs", nargs="*", default=[], metavar="VARIANT:PHASE=DIR",
                        help="runs already trained with the quickstart command and the variant's overrides, e.g. "
                             "quickstart:test=runs/quickstart (checked against the variant's config)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--heal-steps", type=int, default=0,
                        help="also choose a harder pruning + heal on the validation runs and deploy it (0: no heal)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="variants run at once, one process each (each uses one thread; default 1)")
    args = parser.parse_args()
    if args.heal_steps < 0:
        raise SystemExit(f"--heal-steps: {args.heal_steps} is invalid; accepted: an integer >= 0")
    if args.jobs < 1:
        raise SystemExit(f"--jobs: {args.jobs} is invalid; accepted: an integer >= 1")

    out = Path(args.out)
    given = dict(item.split("=", 1) for item in args.runs)
    results = {"protocol": __doc__.split("\n\n")[1], "tasks": TASKS, "validation_fraction": VALIDATION_FRACTION,
               "grid": GRID, "heal_budgets": HEAL_BUDGETS, "heal_losses": HEAL_LOSSES, "heal_lr_scales": HEAL_LR_SCALES,
               "heal_steps": args.heal_steps}
    if args.jobs == 1:
        variants = {variant: variant_result(variant, out, given, args.heal_steps) for variant in args.variants}
    else:  # one process per variant (spawned: torch's thread pools do not survive a fork)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {variant: pool.submit(variant_result, variant, out, given, args.heal_steps)
                       for variant in args.variants}
            variants = {variant: future.result() for variant, future in futures.items()}
    results["variants"] = variants
    out.mkdir(parents=True, exist_ok=True)
    (out / "deploy_quickstart.json").write_text(json.dumps(results, indent=2))
    table = format_results(results)
    (out / "deploy_quickstart.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
