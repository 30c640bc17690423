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
# plan name -> the bench/plan.py target whose budget (and fixed dropping) it is compared with
TARGETS = {"dropping_at_lean_memory_auto": "plan_at_lean_memory_auto",
           "dropping_at_tinytl_memory": "plan_at_tinytl_memory"}


def drop_block_sets(config) -> list[list[int]]:
    """The config's dropping blocks (the paper's, scaled), and the same without the first: fewer tokens drop."""
    blocks = list(config.token_drop.resolve_blocks(config.model.depth))
    return [blocks, blocks[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    plan_bench.add_arguments(parser)
    parser.add_argument("--validate-steps", type=int, default=100, help="steps of each dropping's short run")
    args = parser.parse_args()
    from moebsr.planning.budget import Budget
    from moebsr.planning.candidates import plan_candidates
    from moebsr.planning.plan import levers_of

    out = Path(args.out)
    fixed_results = json.loads((out / f"plan_{args.size}.json").read_text())
    if fixed_results["overrides"] != args.overrides or fixed_results["seeds"] != args.seeds:
        raise SystemExit(f"plan_{args.size}.json was made with overrides {fixed_results['overrides']} and seeds "
                         f"{fixed_results['seeds']}; run with the same")
    planning_config = plan_bench.config_for("paper_bsr", args, validation=True)
    plans, planning_cpu_s = {}, {}
    for name, fixed in TARGETS.items():
        started = time.process_time()
        limit = fixed_results["plans"][fixed]["budget_value"]
        budget = Budget("memory", limit, False, f"memory={limit / 2 ** 20:.2f}MiB (the budget of {fixed})")
        plans[name] = plan_candidates(planning_config, budget, args.batches, out / f"plan_dropping_{args.size}" /
                                     f"{name}.yaml", KEEP_RATES, drop_block_sets(planning_config),
                                     args.validate_steps, levers="auto")
        planning_cpu_s[name] = time.process_time() - started
        changed = {key: value for key, value in plans[name]["levers"].items()
                   if value != levers_of(planning_config)[key]}
        rate, blocks = plans[name]["keep_rate"], plans[name]["drop_blocks"]
        dropping = ["token_drop.enabled=false"] if rate == 1.0 else [
            f"token_drop.keep_rate={rate:g}", f"token_drop.blocks=[{','.join(map(str, blocks))}]"]
        RECIPES[name] = plan_bench.plan_overrides(plans[name]["units"], changed) + dropping
        accuracy.LR_GRID[name] = sorted(float(lr) for lr in fixed_results["accuracy"][fixed]
                                        ["lr_sweep_validation_mean_top1"])  # the fixed-rate plan's grid
    if args.plan_only:
        for name, report in plans.items():
            print(f"{name}: keep rate {report['keep_rate']:g} at {report['drop_blocks']}, {report['plan']}; overrides "
                  f"{RECIPES[name]}; planning {planning_cpu_s[name]:.0f} s CPU")
        return
    rows = plan_bench.train_recipes(list(TARGETS), args)
    results = {"protocol": __doc__.split("\n\n")[1], "overrides": args.overrides, "seeds": args.seeds,
               "keep_rates": KEEP_RATES, "drop_blocks": drop_block_sets(planning_config),
               "validate_steps": args.validate_steps, "plans": plans,
               "planning_cpu_s": planning_cpu_s, "accuracy": rows,
               "profiled": {name: plan_bench.profile_plan(name, args) for name in TARGETS},
               "fixed": {fixed: {"plan": fixed_results["plans"][fixed]["plan"],
                                 "memory_bytes": fixed_results["profiled"][fixed]["train_memory_bytes"],
                                 "summary": fixed_results["accuracy"][fixed]["summary"]} for fixed in TARGETS.values()},
               "full": fixed_results["presets_accuracy"]["full"]}
    (out / f"plan_dropping_{args.size}.json").write_text(json.dumps(results, indent=2))
    table = format_table(results)
    (out / f"plan_dropping_{args.size}.md").write_text(table + "\n")
    print(table)


def format_table(results: dict) -> str:
    full = results["full"]["mean"]["mean"]
    lines = ["| budget | dropping | what trains | train memory (MiB) | mean top-1 (3 seeds) | vs full | vs the "
             "config's dropping |", "|---|---|---|---|---|---|---|"]

    def cell(summary: dict) -> str:
        return f"{summary['mean']['mean'] * 100:.2f} ± {summary['mean']['std'] * 100:.2f}"

    def label(option: dict) -> str:
        if option["keep_rate"] == 1.0:
            return "none"
        return f"{option['keep_rate']:g} at {','.join(map(str, option['drop_blocks']))}"

    held_out = []
    for name, fixed in TARGETS.items():
        plan, row, reference = results["plans"][name], results["accuracy"][name], results["fixed"][fixed]
        fixed_mean = reference["summary"]["mean"]["mean"]
        blocks = ",".join(map(str, results["drop_blocks"][0]))
        lines.append(f"| {fixed} | 0.5 at {blocks} (the config's) | {reference['plan']} | "
                     f"{reference['memory_bytes'] / 2 ** 20:.1f} | {cell(reference['summary'])} | "
                     f"{(fixed_mean - full) * 100:+.2f} pt | — |")
        mean = row["summary"]["mean"]["mean"]
        lines.append(f"| {fixed} | {label(plan)} (chosen) | {plan['plan']} | "
                     f"{results['profiled'][name]['train_memory_bytes'] / 2 ** 20:.1f} | {cell(row['summary'])} | "
                     f"{(mean - full) * 100:+.2f} pt | {(mean - fixed_mean) * 100:+.2f} pt |")
        held_out.append(f"- {fixed}'s budget: " + ", ".join(
            f"{label(option)}: " + ("no plan fits" if option["validation_headline"] is None else
                                    f"{option['validation_headline'] * 100:.2f} (importance {option['score']:.2f})")
            for option in plan["candidate_options"]))
    lines += ["", f"Held-out mean top-1 (%) of each dropping's plan after {results['validate_steps']} steps, and its "
              "Fisher importance:", *held_out, "",
              "Planning with the droppings (one thread, CPU s; each includes its short runs): " + ", ".join(
                  f"{name} {seconds:.0f} s (short runs: {results['plans'][name]['validation_seconds']:.0f} s wall)"
                  for name, seconds in results["planning_cpu_s"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
