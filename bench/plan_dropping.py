"""Does choosing how many tokens drop, and where (``moebsr plan --keep-rates --drop-blocks``), beat planning with the
config's own dropping?

1. The budgets of two of ``bench/plan.py``'s targets, read from ``bench/results/plan_<size>.json`` (same protocol:
   5 offline tasks, batch 64, the validation split carved from the training data): the lean preset's memory and
   0.154x of full fine-tuning, both with ``--levers auto``; there the plans keep 50 % of the tokens at the paper's
   dropping blocks (scaled), as the config does.
2. At each budget, ``--keep-rates 1 0.7 0.5 --drop-blocks <the paper's, scaled> <the same but the first>
   --validate-steps N``: one plan per dropping (keep rate 1: none), each trained N steps on the training part and
   compared on the held-out validation part (the same 15 % split the accuracy benchmark picks learning rates on; the
   test splits are never seen), the best written.
3. Each written plan is a recipe of the accuracy benchmark: its learning rate picked on the validation split from the
   grid of the fixed-dropping plan it is compared with, then 3 seeds on the test splits. The fixed-dropping plans'
   rows are read from ``bench/results/plan_<size>.json``, full fine-tuning's from ``accuracy_<size>.json``.

    python bench/plan_dropping.py train.steps=600                  # the 6-block backbone
    python bench/plan_dropping.py --size formula12 train.steps=600  # the 12-block one

Writes ``bench/results/plan_dropping_<size>.{json,md}`` and each plan's configs and reports under
``bench/results/plan_dropping_<size>/``.

With ``--expert-ranks full 8`` the candidates are the experts' form instead (whole copies or rank-8 deltas,
``moe.expert_rank``) at the config's dropping: the same budgets, short runs and protocol, written to
``plan_expert_rank_<size>.*``:

    python bench/plan_dropping.py --expert-ranks full 8 train.steps=600
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import accuracy
import plan as plan_bench
from recipes import RECIPES

KEEP_RATES = [1.0, 0.7, 0.5]
# the bench/plan.py targets whose budgets (and fixed dropping, whole experts) the plans are compared with
FIXED_TARGETS = ("plan_at_lean_memory_auto", "plan_at_tinytl_memory")


def targets(args: argparse.Namespace) -> dict[str, str]:
    """Plan name (its accuracy runs' folder) -> the bench/plan.py target it is compared with."""
    prefix = "ranks" if args.expert_ranks else "dropping"
    return {fixed.replace("plan", prefix, 1): fixed for fixed in FIXED_TARGETS}


def drop_block_sets(config) -> list[list[int]]:
    """The config's dropping blocks (the paper's, scaled), and the same without the first: fewer tokens drop."""
    blocks = list(config.token_drop.resolve_blocks(config.model.depth))
    return [blocks, blocks[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    plan_bench.add_arguments(parser)
    parser.add_argument("--validate-steps", type=int, default=100, help="steps of each candidate's short run")
    parser.add_argument("--expert-ranks", nargs="+", default=None,
                        help="compare these expert ranks (full: whole copies) at the config's dropping instead")
    args = parser.parse_args()
    from moebsr.planning.budget import Budget
    from moebsr.planning.candidates import plan_candidates

    bench_name = "plan_expert_rank" if args.expert_ranks else "plan_dropping"
    plan_targets = targets(args)
    out = Path(args.out)
    fixed_results = json.loads((out / f"plan_{args.size}.json").read_text())
    if fixed_results["overrides"] != args.overrides or fixed_results["seeds"] != args.seeds:
        raise SystemExit(f"plan_{args.size}.json was made with overrides {fixed_results['overrides']} and seeds "
                         f"{fixed_results['seeds']}; run with the same")
    planning_config = plan_bench.config_for("paper_bsr", args, validation=True)
    keep_rates, block_sets = (None, None) if args.expert_ranks else (KEEP_RATES, drop_block_sets(planning_config))
    plans, planning_cpu_s = {}, {}
    for name, fixed in plan_targets.items():
        started = time.process_time()
        limit = fixed_results["plans"][fixed]["budget_value"]
        budget = Budget("memory", limit, False, f"memory={limit / 2 ** 20:.2f}MiB (the budget of {fixed})")
        plans[name] = plan_candidates(planning_config, budget, args.batches, out / f"{bench_name}_{args.size}" /
                                      f"{name}.yaml", keep_rates, block_sets, args.validate_steps, levers="auto",
                                      expert_ranks=args.expert_ranks)
        planning_cpu_s[name] = time.process_time() - started
        RECIPES[name] = plan_recipe(plans[name], plans[name]["levers"], planning_config)
        accuracy.LR_GRID[name] = sorted(float(lr) for lr in fixed_results["accuracy"][fixed]
                                        ["lr_sweep_validation_mean_top1"])  # the fixed-rate plan's grid
    # dropping: the chosen plan of each budget trains; expert ranks: every candidate's plan, except one that is the
    # fixed plan itself (whole experts, the config's dropping, the same units and levers), whose row is read
    trained, reused = (list(plan_targets), {}) if not args.expert_ranks else candidate_recipes(
        plans, plan_targets, fixed_results, out / f"{bench_name}_{args.size}", planning_config)
    if args.plan_only:
        for name, report in plans.items():
            print(f"{name}: {candidate_label(report)}, {report['plan']}; overrides {RECIPES[name]}; planning "
                  f"{planning_cpu_s[name]:.0f} s CPU")
        return
    rows = plan_bench.train_recipes(trained, args)
    results = {"protocol": __doc__.split("\n\n")[1], "overrides": args.overrides, "seeds": args.seeds,
               "keep_rates": keep_rates, "drop_blocks": drop_block_sets(planning_config),
               "expert_ranks": args.expert_ranks, "targets": plan_targets, "reused": reused,
               "validate_steps": args.validate_steps, "plans": plans,
               "planning_cpu_s": planning_cpu_s, "accuracy": rows,
               "profiled": {name: plan_bench.profile_plan(name, args) for name in trained},
               "fixed": {fixed: {"plan": fixed_results["plans"][fixed]["plan"],
                                 "memory_bytes": fixed_results["profiled"][fixed]["train_memory_bytes"],
                                 "summary": fixed_results["accuracy"][fixed]["summary"]}
                         for fixed in plan_targets.values()},
               "full": fixed_results["presets_accuracy"]["full"]}
    (out / f"{bench_name}_{args.size}.json").write_text(json.dumps(results, indent=2))
    table = format_table(results) if not args.expert_ranks else format_rank_table(results)
    (out / f"{bench_name}_{args.size}.md").write_text(table + "\n")
    print(table)


def plan_recipe(plan: dict, levers: dict, planning_config) -> list[str]:
    """The overrides that train ``plan`` (a plan report): its units, the levers it changed, its dropping and experts."""
    from moebsr.planning.plan import levers_of
    changed = {key: value for key, value in levers.items() if value != levers_of(planning_config)[key]}
    rate, blocks, rank = plan["keep_rate"], plan["drop_blocks"], plan.get("expert_rank")
    dropping = ["token_drop.enabled=false"] if rate == 1.0 else [
        f"token_drop.keep_rate={rate:g}", f"token_drop.blocks=[{','.join(map(str, blocks))}]"]
    return plan_bench.plan_overrides(plan["units"], changed) + dropping + (
        [f"moe.expert_rank={rank}"] if rank is not None else [])


def rank_recipe_name(name: str, option: dict) -> str:
    return f"{name}_rank{option['expert_rank'] or 'full'}"


def candidate_recipes(plans: dict, plan_targets: dict, fixed_results: dict, folder: Path,
                      planning_config) -> tuple[list[str], dict[str, str]]:
    """Every candidate plan of every budget as a recipe (its LR grid the fixed plan's); returns the recipes to train
    and, per candidate recipe that is its budget's fixed plan, that plan's name (its rows are read, not re-run)."""
    trained, reused = [], {}
    for name, fixed in plan_targets.items():
        fixed_plan = fixed_results["plans"][fixed]
        for option in plans[name]["candidate_options"]:
            own = json.loads((folder / option["config"]).with_suffix(".plan.json").read_text())
            recipe = rank_recipe_name(name, option)
            same = (option["expert_rank"] is None and option["plan"] == fixed_plan["plan"]
                    and own["levers"] == fixed_plan["levers"]
                    and option["keep_rate"] == planning_config.token_drop.keep_rate)
            if same:
                reused[recipe] = fixed
                continue
            RECIPES[recipe] = plan_recipe({**own, **option}, own["levers"], planning_config)
            accuracy.LR_GRID[recipe] = accuracy.LR_GRID[name]
            trained.append(recipe)
    return trained, reused


def format_rank_table(results: dict) -> str:
    """Per budget, every expert rank's plan on the full protocol, the chosen one marked, against whole experts."""
    full = results["full"]["mean"]["mean"]
    lines = ["| budget | experts | what trains | train memory (MiB) | mean top-1 (3 seeds) | vs full | held-out after "
             f"{results['validate_steps']} steps | importance |", "|---|---|---|---|---|---|---|---|"]
    for name, fixed in results["targets"].items():
        plan = results["plans"][name]
        for option in plan["candidate_options"]:
            recipe = rank_recipe_name(name, option)
            if recipe in results["reused"]:
                reference = results["fixed"][fixed]
                summary, memory = reference["summary"], reference["memory_bytes"]
            else:
                summary, memory = results["accuracy"][recipe]["summary"], \
                    results["profiled"][recipe]["train_memory_bytes"]
            chosen = " (chosen)" if option["expert_rank"] == plan["expert_rank"] else ""
            experts = "whole" if option["expert_rank"] is None else f"rank {option['expert_rank']}"
            lines.append(f"| {fixed} | {experts}{chosen} | {option['plan']} | {memory / 2 ** 20:.1f} | "
                         f"{summary['mean']['mean'] * 100:.2f} ± {summary['mean']['std'] * 100:.2f} | "
                         f"{(summary['mean']['mean'] - full) * 100:+.2f} pt | "
                         f"{option['validation_headline'] * 100:.2f} | {option['score']:.2f} |")
    lines += ["", "Planning with the candidates (one thread, CPU s; each includes its short runs): " + ", ".join(
        f"{name} {seconds:.0f} s (short runs: {results['plans'][name]['validation_seconds']:.0f} s wall)"
        for name, seconds in results["planning_cpu_s"].items())]
    return "\n".join(lines)


def candidate_label(option: dict) -> str:
    """A candidate's dropping (``none``, or the keep rate at its blocks), with its experts' form when one was set."""
    dropping = "none" if option["keep_rate"] == 1.0 else \
        f"{option['keep_rate']:g} at {','.join(map(str, option['drop_blocks']))}"
    if option.get("expert_rank") is None:
        return dropping
    return f"{dropping}, rank-{option['expert_rank']} experts"


def format_table(results: dict) -> str:
    full = results["full"]["mean"]["mean"]
    ranks = bool(results.get("expert_ranks"))
    compared = "whole experts" if ranks else "the config's dropping"
    candidate = "dropping, experts" if ranks else "dropping"
    lines = [f"| budget | {candidate} | what trains | train memory (MiB) | mean top-1 (3 seeds) | vs full | vs "
             f"{compared} |", "|---|---|---|---|---|---|---|"]

    def cell(summary: dict) -> str:
        return f"{summary['mean']['mean'] * 100:.2f} ± {summary['mean']['std'] * 100:.2f}"

    held_out = []
    plan_targets = results["targets"]
    for name, fixed in plan_targets.items():
        plan, row, reference = results["plans"][name], results["accuracy"][name], results["fixed"][fixed]
        fixed_mean = reference["summary"]["mean"]["mean"]
        blocks = ",".join(map(str, results["drop_blocks"][0]))
        lines.append(f"| {fixed} | 0.5 at {blocks} (the config's){', whole experts' if ranks else ''} | "
                     f"{reference['plan']} | {reference['memory_bytes'] / 2 ** 20:.1f} | "
                     f"{cell(reference['summary'])} | {(fixed_mean - full) * 100:+.2f} pt | — |")
        mean = row["summary"]["mean"]["mean"]
        lines.append(f"| {fixed} | {candidate_label(plan)} (chosen) | {plan['plan']} | "
                     f"{results['profiled'][name]['train_memory_bytes'] / 2 ** 20:.1f} | {cell(row['summary'])} | "
                     f"{(mean - full) * 100:+.2f} pt | {(mean - fixed_mean) * 100:+.2f} pt |")
        held_out.append(f"- {fixed}'s budget: " + ", ".join(
            f"{candidate_label(option)}: " + ("no plan fits" if option["validation_headline"] is None else
               f"{option['validation_headline'] * 100:.2f} (importance {option['score']:.2f})")
            for option in plan["candidate_options"]))
    lines += ["", f"Held-out mean top-1 (%) of each candidate's plan after {results['validate_steps']} steps, and its "
              "Fisher importance:", *held_out, "",
              "Planning with the candidates (one thread, CPU s; each includes its short runs): " + ", ".join(
                  f"{name} {seconds:.0f} s (short runs: {results['plans'][name]['validation_seconds']:.0f} s wall)"
                  for name, seconds in results["planning_cpu_s"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
