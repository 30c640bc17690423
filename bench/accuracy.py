"""Accuracy of fine-tuning recipes on real offline data, from a backbone that never saw any of it.

Protocol (no pretrained weights can be downloaded here; docs/results/accuracy.md):
1. The backbone is ``backbones/formula_vit_6x128_28px.safetensors``: the quickstart's dense ViT pretrained by
   ``configs/pretrain.yaml`` on formula-driven contours and fractals only, so every shipped real task is downstream.
2. Each recipe upcycles it into the same MoE-ViT (16 experts, top-4, one gate per task, blocks scaled from the
   paper's) and fine-tunes all five offline tasks at once (``mnist``, ``mnist_parity``, ``digits``, ``digits_parity``,
   ``animals``) with the quickstart's batch (64), warm-up + cosine schedule and joint sampler, and the same steps
   for every recipe (the quickstart's 1,200 by default; the published table ran 600 to fit the 2-core budget).
3. Learning rate: per recipe, the best of a small grid on a validation split carved from the training data
   (``validation_fraction``, seed 0); never the test split.
4. At that rate, ``--seeds`` runs on the test split; top-1 mean and standard deviation per task and over tasks.

    python bench/accuracy.py train.steps=600                   # docs/results/accuracy.md: all recipes, 3 seeds (~1.5 h)
    python bench/accuracy.py                                   # the same at the quickstart's 1,200 steps (~3 h)
    python bench/accuracy.py --recipes full paper_bsr --seeds 0 1 2
    python bench/accuracy.py --size formula12 train.steps=600 --recipes full paper_bsr lean   # the 12-block backbone

``--size formula12`` runs the same protocol on the committed 12-block backbone
(``backbones/formula_vit_12x128_28px.safetensors``), where the paper's blocks exist unscaled: MoE and BSR at 3/7/11,
dropping at 3/6/9.

Each run's ``metrics.json`` is kept under ``<out>/accuracy_runs/`` (``accuracy_runs/<size>/`` for another size); a
re-run skips the runs already there, so an interrupted benchmark resumes. Rows of recipes not named in ``--recipes``
stay in the results file when it was made with the same tasks, seeds and overrides. Writes
``<out>/accuracy_quickstart.json`` and ``.md`` (read by ``bench/compare.py``); ``accuracy_<size>.{json,md}`` for
another size.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from recipes import RECIPES, REPO, cached_run, recipe_overrides

TASKS = ["mnist", "mnist_parity", "digits", "digits_parity", "animals"]
DEFAULT_RECIPES = ["full", "full_drop", "paper_bsr", "paper_bsr_per_task", "bsr_no_drop", "paper_bsr_frozen_experts",
                   "bsr_last_3", "lora_paper_blocks", "head_only"]
# recipes that train few parameters get a grid shifted up (every BSR variant picked the default grid's top, 3e-3)
HIGH_GRID = [1e-3, 3e-3, 1e-2]
LR_GRID = {"default": [3e-4, 1e-3, 3e-3], "head_only": HIGH_GRID, "lora_paper_blocks": HIGH_GRID,
           "last_3_moe_drop": HIGH_GRID, "lean": HIGH_GRID, "paper_bsr_low_rank": HIGH_GRID,
           "lean_low_rank": HIGH_GRID}
VALIDATION_FRACTION = 0.15


def run(recipe: str, lr: float, seed: int, validation: bool, args: argparse.Namespace) -> dict[str, float]:
    """Top-1 per task of one fine-tuning run (cached: a finished run is read back, not re-run)."""
    phase = "validation" if validation else "test"
    runs = Path(args.out) / "accuracy_runs" / ("" if args.size == "quickstart" else args.size)
    output = runs / recipe / f"{phase}-lr{lr:g}-seed{seed}"
    overrides = recipe_overrides(args.size, recipe) + [
        f"tasks=[{','.join(TASKS)}]", f"train.lr={lr}", f"train.seed={seed}", f"train.output_dir={output}",
        "train.checkpoint_every=0", "logging.trackers=[none]", "logging.progress=false", *args.overrides]
    if validation:
        overrides += [f"data.task_options.{task}.validation_fraction={VALIDATION_FRACTION}" for task in TASKS]
    metrics = cached_run(output, overrides, f"{recipe}: {phase} lr {lr:g} seed {seed}", threads=args.threads)
    return {task: metrics[task]["top1"] for task in TASKS}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarise(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and (sample) standard deviation over seeds, per task and for the mean over tasks."""
    columns = {task: [run[task] for run in per_seed] for task in TASKS}
    columns["mean"] = [mean([run[task] for task in TASKS]) for run in per_seed]
    return {name: {"mean": mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
            for name, values in columns.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["quickstart", "formula12"], default="quickstart",
                        help="the backbone: the committed 6-block one (quickstart) or the 12-block one (formula12)")
    parser.add_argument("--recipes", nargs="*", default=DEFAULT_RECIPES, choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (default 1: the model's ops are too small to share, and two OpenMP "
                             "threads spin-wait whenever another process holds one of the cores)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run (e.g. train.steps=600)")
    args = parser.parse_args()
    results: dict = {"protocol": __doc__.split("\n\n")[1], "tasks": TASKS, "seeds": args.seeds,
                     "validation_fraction": VALIDATION_FRACTION, "overrides": args.overrides, "recipes": {}}
    for recipe in args.recipes:
        grid = LR_GRID.get(recipe, LR_GRID["default"])
        sweep = {lr: mean(list(run(recipe, lr, 0, True, args).values())) for lr in grid}
        best = max(sweep, key=sweep.get)
        per_seed = [run(recipe, best, seed, False, args) for seed in args.seeds]
        results["recipes"][recipe] = {"lr_sweep_validation_mean_top1": sweep, "lr": best, "per_seed": per_seed,
                                      "summary": summarise(per_seed)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keep_earlier_rows(results, out / f"accuracy_{args.size}.json")
    (out / f"accuracy_{args.size}.json").write_text(json.dumps(results, indent=2))
    table = format_table(results)
    (out / f"accuracy_{args.size}.md").write_text(table + "\n")
    print(table)


def keep_earlier_rows(results: dict, path: Path) -> None:
    """Rows of recipes this call did not run stay in the results file, when it was made by the same protocol (tasks,
    seeds, validation share, overrides), so a new recipe is added beside the earlier ones without re-running them."""
    if not path.is_file():
        return
    earlier = json.loads(path.read_text())
    if all(earlier.get(key) == results[key] for key in ("tasks", "seeds", "validation_fraction", "overrides")):
        merged = {**earlier["recipes"], **results["recipes"]}  # a re-run recipe keeps its place
        results["recipes"] = {"full": merged["full"], **merged} if "full" in merged else merged  # the baseline first


def format_table(results: dict) -> str:
    recipes = results["recipes"]
    full = recipes.get("full", {}).get("summary", {}).get("mean", {}).get("mean")
    lines = [f"Top-1 (%) on the test splits, mean ± std over seeds {results['seeds']}; learning rate picked per recipe "
             f"on a {results['validation_fraction']:g} validation split of the training data.", "",
             "| recipe | lr | " + " | ".join(results["tasks"]) + " | mean | vs full |",
             "|---|---|" + "---|" * (len(results["tasks"]) + 2)]
    for name, recipe in recipes.items():
        summary = recipe["summary"]
        cells = [f"{summary[t]['mean'] * 100:.2f} ± {summary[t]['std'] * 100:.2f}" for t in [*results["tasks"], "mean"]]
        delta = "—" if full is None or name == "full" else f"{(summary['mean']['mean'] - full) * 100:+.2f} pt"
        lines.append(f"| {name} | {recipe['lr']:g} | " + " | ".join(cells) + f" | {delta} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
