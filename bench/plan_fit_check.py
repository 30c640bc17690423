"""Does a benchmark plan survive ``moebsr plan``'s own budget-fitted scoring?

``bench/plan.py`` scores the units once for all its budgets (fp32, the whole batch), which can hold more than a tight
budget; ``moebsr plan`` alone sizes scoring to its budget (micro-batches, or bf16 frozen weights). This re-plans one
of the benchmark's targets that way and says whether the plan and levers are the same.

    python bench/plan_fit_check.py --size formula12 --target plan_at_tinytl_memory_accumulated train.steps=600
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import plan as bench_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["quickstart", "formula12"], default="formula12")
    parser.add_argument("--target", default="plan_at_tinytl_memory_accumulated", choices=list(bench_plan.TARGETS))
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="the benchmark's overrides (e.g. train.steps=600)")
    args = parser.parse_args()
    from moebsr.planning.budget import Budget
    from moebsr.planning.plan import run_plan

    written = json.loads((bench_plan.REPO / "bench" / "results" / f"plan_{args.size}" / f"{args.target}.plan.json")
                         .read_text())
    _, _, levers, accumulate = bench_plan.TARGETS[args.target]
    config = bench_plan.config_for("paper_bsr", args, validation=True)
    started = time.process_time()
    with tempfile.TemporaryDirectory() as folder:
        report = run_plan(config, Budget("memory", written["budget_value"], False, written["budget"]), args.batches,
                          Path(folder) / "p.yaml", levers=levers, accumulate=accumulate)
    memory = report["planning_memory"]
    print(f"{args.target}: same plan {report['plan'] == written['plan']}, same levers "
          f"{report['levers'] == written['levers']}; scoring {memory['scoring'] / 2 ** 20:.1f} MiB in micro-batches "
          f"of {report['importance_micro_batch']} (low precision: {memory['scoring_low_precision']}), measuring "
          f"{memory['measuring'] / 2 ** 20:.1f} MiB, budget {written['budget_value'] / 2 ** 20:.2f} MiB; "
          f"{time.process_time() - started:.0f} s CPU")


if __name__ == "__main__":
    main()
