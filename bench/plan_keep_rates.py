"""Does choosing the keep rate too (``moebsr plan --keep-rates``) beat planning at the config's own keep rate?

1. The budgets of two of ``bench/plan.py``'s targets, read from ``bench/results/plan_<size>.json`` (same protocol:
   5 offline tasks, batch 64, the validation split carved from the training data): the lean preset's memory and
   0.154x of full fine-tuning, both with ``--levers auto``; there the plans keep 50 % of the tokens at the paper's
   dropping blocks (scaled), as the config does.
2. At each budget, ``--keep-rates 1 0.7 0.5 --validate-steps N``: one plan per keep rate (1: no dropping), each
   trained N steps on the training part and compared on the held-out validation part (the same 15 % split the
   accuracy benchmark picks learning rates on; the test splits are never seen), the best written.
3. Each written plan is a recipe of the accuracy benchmark: its learning rate picked on the validation split from the
   grid of the fixed-rate plan it is compared with, then 3 seeds on the test splits. The fixed-rate plans' rows are
   read from ``bench/results/plan_<size>.json``, full fine-tuning's from ``accuracy_<size>.json``.

    python bench/plan_keep_rates.py train.steps=600                  # the 6-block backbone
    python bench/plan_keep_rates.py --size formula12 train.steps=600  # the 12-block one

Writes ``bench/results/plan_keep_rates_<size>.{json,md}`` and each plan's configs and reports under
``bench/results/plan_keep_rates_<size>/``.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import accuracy
import plan as plan_bench
from recipes import RECIPES, REPO

KEEP_RATES = [1.0, 0.7, 0.5]
# plan name -> the bench/plan.py target whose budget (and fixed keep rate) it is compared with
TARGETS = {"keep_rates_at_lean_memory_auto": "plan_at_lean_memory_auto",
           "keep_rates_at_tinytl_memory": "plan_at_tinytl_memory"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["quickstart", "formula12"], default="quickstart")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=2, help="batches of every task the planner scores on")
    parser.add_argument("--validate-steps", type=int, default=100, help="steps of each keep rate's short run")
    parser.add_argument("--jobs", type=int, default=2, help="training runs at a time (one thread each)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plan-only", action="store_true", help="plan and print the plans, train nothing")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (e.g. train.steps=600)")
    args = parser.parse_args()
    from moebsr.planning.budget import Budget
    from moebsr.planning.keep_rates import plan_keep_rates
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
        plans[name] = plan_keep_rates(planning_config, budget, args.batches, out / f"plan_keep_rates_{args.size}" /
                                      f"{name}.yaml", KEEP_RATES, args.validate_steps, levers="auto")
        planning_cpu_s[name] = time.process_time() - started
        changed = {key: value for key, value in plans[name]["levers"].items()
                   if value != levers_of(planning_config)[key]}
        rate = plans[name]["keep_rate"]
        dropping = [] if rate == planning_config.token_drop.keep_rate else (
            ["token_drop.enabled=false"] if rate == 1.0 else [f"token_drop.keep_rate={rate:g}"])
        RECIPES[name] = plan_bench.plan_overrides(plans[name]["units"], changed) + dropping
        accuracy.LR_GRID[name] = sorted(float(lr) for lr in fixed_results["accuracy"][fixed]
                                        ["lr_sweep_validation_mean_top1"])  # the fixed-rate plan's grid
    if args.plan_only:
        for name, report in plans.items():
            print(f"{name}: keep rate {report['keep_rate']:g}, {report['plan']}; overrides {RECIPES[name]}; planning "
                  f"{planning_cpu_s[name]:.0f} s CPU")
        return
    rows = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        for name in TARGETS:
            sweep_runs = {lr: pool.submit(accuracy.run, name, lr, 0, True, args) for lr in accuracy.LR_GRID[name]}
            sweep = {lr: accuracy.mean(list(run.result().values())) for lr, run in sweep_runs.items()}
            best = max(sweep, key=sweep.get)
            per_seed = [run.result() for run in [pool.submit(accuracy.run, name, best, seed, False, args)
                                                  for seed in args.seeds]]
            rows[name] = {"lr_sweep_validation_mean_top1": sweep, "lr": best, "per_seed": per_seed,
                          "summary": accuracy.summarise(per_seed)}
    results = {"protocol": __doc__.split("\n\n")[1], "overrides": args.overrides, "seeds": args.seeds,
               "keep_rates": KEEP_RATES, "validate_steps": args.validate_steps, "plans": plans,
               "planning_cpu_s": planning_cpu_s, "accuracy": rows,
               "profiled": {name: plan_bench.profile_plan(name, args) for name in TARGETS},
               "fixed": {fixed: {"plan": fixed_results["plans"][fixed]["plan"],
                                 "memory_bytes": fixed_results["profiled"][fixed]["train_memory_bytes"],
                                 "summary": fixed_results["accuracy"][fixed]["summary"]} for fixed in TARGETS.values()},
               "full": fixed_results["presets_accuracy"]["full"]}
    (out / f"plan_keep_rates_{args.size}.json").write_text(json.dumps(results, indent=2))
    table = format_table(results)
    (out / f"plan_keep_rates_{args.size}.md").write_text(table + "\n")
    print(table)


def format_table(results: dict) -> str:
    full = results["full"]["mean"]["mean"]
    lines = ["| budget | keep rate | what trains | train memory (MiB) | held-out top-1 after the short runs "
             "| mean top-1 (3 seeds) | vs full | vs the fixed keep rate |", "|---|---|---|---|---|---|---|---|"]

    def cell(summary: dict) -> str:
        return f"{summary['mean']['mean'] * 100:.2f} ± {summary['mean']['std'] * 100:.2f}"

    for name, fixed in TARGETS.items():
        plan, row, reference = results["plans"][name], results["accuracy"][name], results["fixed"][fixed]
        fixed_mean = reference["summary"]["mean"]["mean"]
        lines.append(f"| {fixed} | 0.5 (the config's) | {reference['plan']} | "
                     f"{reference['memory_bytes'] / 2 ** 20:.1f} | — | {cell(reference['summary'])} | "
                     f"{(fixed_mean - full) * 100:+.2f} pt | — |")
        held_out = ", ".join(f"{option['keep_rate']:g}: " + ("—" if option["validation_headline"] is None else
                                                             f"{option['validation_headline'] * 100:.2f}")
                             for option in plan["keep_rate_options"])
        mean = row["summary"]["mean"]["mean"]
        lines.append(f"| {fixed} | {plan['keep_rate']:g} (chosen) | {plan['plan']} | "
                     f"{results['profiled'][name]['train_memory_bytes'] / 2 ** 20:.1f} | {held_out} | "
                     f"{cell(row['summary'])} | {(mean - full) * 100:+.2f} pt | {(mean - fixed_mean) * 100:+.2f} pt |")
    lines += ["", "Planning with the keep rates (one thread, CPU s; each includes its short runs): " + ", ".join(
        f"{name} {seconds:.0f} s (short runs: {results['plans'][name]['validation_seconds']:.0f} s wall)"
        for name, seconds in results["planning_cpu_s"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
