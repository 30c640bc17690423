"""Does ``moebsr plan`` beat the hand-made presets at their own memory? The accuracy benchmark's protocol, with plans.

1. On the accuracy benchmark's model and tasks (``bench/accuracy.py``: the committed 6-block backbone, MoE at 1/3/5,
   16 experts top-4, dropping at 1/3/4 keeping 50 %, or with ``--size formula12`` the 12-block one at the paper's
   blocks, MoE 3/7/11 and dropping 3/6/9; five offline tasks, batch 64, the validation split carved from the
   training data), measure the training memory of the ``paper_bsr`` and ``lean`` presets with ``moebsr
   profile``'s instrument (parameters + gradients + optimizer state + saved activations).
2. Plan for six targets: the paper preset's memory, the lean preset's and half the lean preset's, with the config's
   memory levers (none: the comparison does not lend the plans the lean preset's recomputed experts), the lean
   preset's memory again and 0.154x of full fine-tuning (TinyTL's 6.5x) with ``--levers auto`` (the planner picks
   recomputed experts, bf16 frozen weights and collapsed frozen mixtures where they buy importance), and 0.154x
   again with ``--accumulate`` too (the batch in micro-batches, gradients accumulated: one change at a time). The
   planner scores units on batches of the training part only (the validation share is held out, as for every recipe).
3. Each plan is a recipe of the accuracy benchmark: its learning rate picked on the validation split from the grid of
   the preset it is compared with (the 0.154x plans, compared with full fine-tuning but training a few sub-layers:
   both grids, 3e-4 to 1e-2), then 3 seeds on the test splits. The presets' and full fine-tuning's rows are read
   from ``bench/results/accuracy_<size>.json`` (same protocol, same overrides).
4. Each plan's predicted memory is checked against a real profile of it.

    python bench/plan.py train.steps=600          # docs/results: 38 runs, ~70 min on 2 CPU cores, 2 at a time
    python bench/plan.py --size formula12 train.steps=600   # the same on the 12-block backbone

Writes ``bench/results/plan_<size>.{json,md}`` and each plan's config, report and frontier under
``bench/results/plan_<size>/``; the presets' rows come from ``bench/results/accuracy_<size>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import accuracy
from recipes import BASE_CONFIG, RECIPES, REPO, recipe_overrides

sys.path.insert(0, str(REPO))

# plan name -> (the recipe whose measured memory sets the budget, share of it, the planner's --levers, --accumulate)
TARGETS = {"plan_at_paper_memory": ("paper_bsr", 1.0, "config", False),
           "plan_at_lean_memory": ("lean", 1.0, "config", False),
           "plan_at_half_lean_memory": ("lean", 0.5, "config", False),
           "plan_at_lean_memory_auto": ("lean", 1.0, "auto", False),  # the lean preset uses a lever: the plan its own
           "plan_at_tinytl_memory": ("full", 0.154, "auto", False),  # TinyTL's 6.5x less than full fine-tuning
           "plan_at_tinytl_memory_accumulated": ("full", 0.154, "auto", True)}  # and micro-batches allowed


def config_for(recipe: str, args: argparse.Namespace, validation: bool):
    from moebsr.config import load_config
    overrides = recipe_overrides(args.size, recipe) + [f"tasks=[{','.join(accuracy.TASKS)}]", *args.overrides]
    if validation:
        overrides += [f"data.task_options.{task}.validation_fraction={accuracy.VALIDATION_FRACTION}"
                      for task in accuracy.TASKS]
    return load_config(BASE_CONFIG, overrides)


def preset_memory(recipe: str, args: argparse.Namespace) -> dict:
    from moebsr.analysis.profiling import profile_config
    report = profile_config(config_for(recipe, args, validation=False), steps=1, warmup=1)
    return {key: report[key] for key in ("train_memory_bytes", "trainable_params", "train_flops_per_image",
                                         "saved_activation_bytes_per_image")}


def plan_overrides(units: list[list], levers: dict) -> list[str]:
    from moebsr.planning.costs import units_by_block
    per_block = units_by_block(units)
    sublayers = ", ".join(f"{block}: [{', '.join(names)}]" for block, names in per_block.items())
    return ["bsr.preset=custom", f"bsr.trainable_blocks=[{','.join(map(str, per_block))}]",
            f"bsr.block_sublayers={{{sublayers}}}", "bsr.train_final_norm=true", "bsr.train_embeddings=false",
            *(f"{key}={str(value).lower()}" for key, value in levers.items())]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options this benchmark and ``bench/plan_dropping.py`` share."""
    parser.add_argument("--size", choices=["quickstart", "formula12"], default="quickstart",
                        help="the backbone (bench/accuracy.py --size): 6 blocks (quickstart) or 12 (formula12)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=2, help="batches of every task the planner scores on")
    parser.add_argument("--jobs", type=int, default=2, help="training runs at a time (one thread each)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plan-only", action="store_true", help="plan and print the plans, train nothing")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (e.g. train.steps=600)")


def train_recipes(names: list[str], args: argparse.Namespace) -> dict[str, dict]:
    """Each recipe through the accuracy protocol (learning rate picked on validation from its grid, then every seed
    on test), ``args.jobs`` runs at a time."""
    rows = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        for name in names:
            grid = accuracy.LR_GRID[name]
            sweep_runs = {lr: pool.submit(accuracy.run, name, lr, 0, True, args) for lr in grid}
            sweep = {lr: accuracy.mean(list(run.result().values())) for lr, run in sweep_runs.items()}
            best = max(sweep, key=sweep.get)
            per_seed = [run.result() for run in [pool.submit(accuracy.run, name, best, seed, False, args)
                                                  for seed in args.seeds]]
            rows[name] = {"lr_sweep_validation_mean_top1": sweep, "lr": best, "per_seed": per_seed,
                          "summary": accuracy.summarise(per_seed)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args()
    from moebsr.planning.budget import Budget
    from moebsr.planning.plan import importance_for, levers_of, measure_costs, run_plan

    out = Path(args.out)
    plan_dir = out / f"plan_{args.size}"
    accuracy_file = out / f"accuracy_{args.size}.json"  # the presets' rows, same protocol
    presets = {recipe: preset_memory(recipe, args) for recipe in ("full", "paper_bsr", "lean")}
    planning_config = config_for("paper_bsr", args, validation=True)
    started = time.process_time()
    measured = measure_costs(planning_config)
    data, costs = measured
    importance = importance_for(planning_config, data, args.batches, planning_config.train.batch_size)
    plans = {}
    for name, (preset, share, levers, accumulate) in TARGETS.items():
        limit = presets[preset]["train_memory_bytes"] * share
        budget = Budget("memory", limit, False, f"memory={limit / 2 ** 20:.2f}MiB ({share:g} x {preset})")
        plans[name] = run_plan(planning_config, budget, args.batches, plan_dir / f"{name}.yaml", measured, importance,
                               levers=levers, accumulate=accumulate)
        changed = {key: value for key, value in plans[name]["levers"].items()
                   if value != levers_of(planning_config)[key]}  # a lever left as configured adds no override
        RECIPES[name] = plan_overrides(plans[name]["units"], changed)
        accuracy.LR_GRID[name] = accuracy.LR_GRID.get(preset, accuracy.LR_GRID["default"])
        if preset == "full":  # compared with full fine-tuning but training a few sub-layers: both grids
            accuracy.LR_GRID[name] = sorted(set(accuracy.LR_GRID["default"]) | set(accuracy.HIGH_GRID))
    planning_cpu_s = time.process_time() - started
    if args.plan_only:
        for name, plan in plans.items():
            print(f"{name}: {plan['plan']} (predicted {plan['predicted']['memory_bytes'] / 2 ** 20:.2f} MiB, "
                  f"budget {plan['budget']}); overrides {RECIPES[name]}")
        print(f"planning: {planning_cpu_s:.0f} s CPU, presets {presets}")
        return

    check_same_protocol(accuracy_file, args, required=False)  # before training, when the presets' rows exist already
    args.out = str(out)
    rows = train_recipes(list(TARGETS), args)
    checks = {name: profile_plan(name, args) for name in TARGETS}
    earlier = check_same_protocol(accuracy_file, args, required=True)
    results = {"protocol": __doc__.split("\n\n")[1], "overrides": args.overrides, "seeds": args.seeds,
               "preset_memory": presets, "planning_cpu_s": planning_cpu_s,
               "measured_steps": measured[1].measured_steps, "plans": plans, "accuracy": rows,
               "profiled": checks, "presets_accuracy": {name: earlier["recipes"][name]["summary"]
                                                        for name in ("full", "paper_bsr", "lean")}}
    (out / f"plan_{args.size}.json").write_text(json.dumps(results, indent=2))
    table = format_table(results)
    (out / f"plan_{args.size}.md").write_text(table + "\n")
    print(table)


def check_same_protocol(path: Path, args: argparse.Namespace, required: bool) -> dict:
    """The presets' accuracy file, refused in one line when it was made with other overrides or seeds."""
    if not path.is_file():
        if required:
            raise SystemExit(f"{path} is missing: run python bench/accuracy.py --size {args.size} "
                             f"{' '.join(args.overrides)} --recipes full paper_bsr lean")
        return {}
    earlier = json.loads(path.read_text())
    if earlier["overrides"] != args.overrides or earlier["seeds"] != args.seeds:
        raise SystemExit(f"{path.name} was made with overrides {earlier['overrides']} and seeds {earlier['seeds']}; "
                         f"run with the same (e.g. python bench/plan.py train.steps=600)")
    return earlier


def profile_plan(name: str, args: argparse.Namespace) -> dict:
    from moebsr.analysis.profiling import profile_config
    report = profile_config(config_for(name, args, validation=False), steps=1, warmup=1)
    return {"train_memory_bytes": report["train_memory_bytes"],
            "train_flops_per_image": report["train_flops_per_image"], "trainable_params": report["trainable_params"]}


def total_steps(results: dict) -> int:
    """The shared cost model's steps, plus those of the other lever settings a ``--levers auto`` plan measured."""
    shared = results["measured_steps"]
    return shared + sum(plan["measured_steps"] - shared for plan in results["plans"].values())


def format_table(results: dict) -> str:
    full = results["presets_accuracy"]["full"]["mean"]["mean"]
    full_memory = results["preset_memory"]["full"]["train_memory_bytes"]
    lines = ["| recipe | what trains | train memory (MiB) | memory x less than full | mean top-1 (3 seeds) | vs full |",
             "|---|---|---|---|---|---|"]

    def row(name: str, plan: str, memory: float, summary: dict) -> str:
        mean, std = summary["mean"]["mean"], summary["mean"]["std"]
        delta = "—" if name == "full" else f"{(mean - full) * 100:+.2f} pt"
        return (f"| {name} | {plan} | {memory / 2 ** 20:.1f} | {full_memory / memory:.2f} | "
                f"{mean * 100:.2f} ± {std * 100:.2f} | {delta} |")

    for preset in ("full", "paper_bsr", "lean"):
        lines.append(row(preset, f"preset {preset}", results["preset_memory"][preset]["train_memory_bytes"],
                         results["presets_accuracy"][preset]))
    for name, plan in results["plans"].items():
        measured = results["profiled"][name]["train_memory_bytes"]
        lines.append(row(name, plan["plan"], measured, results["accuracy"][name]["summary"]))
    lines += ["", "Predicted against profiled training memory: " + ", ".join(
        f"{name} {plan['predicted']['memory_bytes'] / results['profiled'][name]['train_memory_bytes']:.4f}"
        for name, plan in results["plans"].items()),
        f"Planning, all {len(results['plans'])} plans (cost models of {total_steps(results)} measured steps, "
        f"importance from 2 batches of every task, one thread): {results['planning_cpu_s']:.0f} s CPU."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
