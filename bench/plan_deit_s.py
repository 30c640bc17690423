"""``moebsr plan`` on DeiT-S (12 blocks, 224 px, MoE 16 experts top-4 at 3/7/11, dropping at 3/6/9): do its
predictions hold on a real-size model, how long does planning take, and can it meet TinyTL's 6.5x (0.154x) training
memory?

1. Profile full fine-tuning of the model (``moebsr profile``'s instrument: parameters + gradients + optimizer state +
   saved activations) at the given batch and precision.
2. ``moebsr plan --budget memory=<share>x --levers auto`` for each share, timed (CPU seconds of this process).
3. Profile each written config: predicted against profiled memory, saved bytes and FLOPs, and the memory breakdown.

4. Time the run each plan is for: 3 steps of the written config (CPU time, after one untimed) times its
   ``train.steps`` (``paper_bsr.yaml``: 20,000), against the planning's CPU time: the share of the run that planning
   costs (the target is under 2 %).

No pretrained DeiT-S can be downloaded here, so the weights are random: the costs (what this measures) do not depend on
them, the importance scores (which plan wins at a budget) do. The tasks are the five offline ones, read at 224 px.
Run it on one thread (``OMP_NUM_THREADS=1``): CPU times are what it reports.

    python bench/plan_deit_s.py                       # shares 0.154 and 0.3, batch 16, bf16 autocast
    python bench/plan_deit_s.py --shares 0.3 --merge  # re-plan 0.3x, keep the other shares' results
    python bench/plan_deit_s.py --name quickstart_run --config configs/quickstart.yaml --tasks mnist mnist_parity \
        digits animals --batch-size 64 --precision no --shares 0.3   # the README's job (1,200 steps)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TASKS = ["mnist", "mnist_parity", "digits", "digits_parity", "animals"]
RUN_TIMED_STEPS = 3  # steps of each written config timed for the run's CPU time (after one untimed)


def overrides(args: argparse.Namespace) -> list[str]:
    return [f"tasks=[{','.join(args.tasks)}]", "model.pretrained=false", f"train.batch_size={args.batch_size}",
            f"train.mixed_precision={args.precision}", "logging.trackers=[none]", "data.num_workers=0", *args.overrides]


def share_value(key: str) -> float:
    """The share a results key names ("0.154x" -> 0.154)."""
    return float(key.rstrip("x"))


def breakdown(profile: dict) -> dict:
    return {"parameters": profile["parameter_bytes"], "gradients": profile["gradient_bytes"],
            "optimizer_state": profile["optimizer_state_bytes"],
            "saved_activations": profile["saved_activation_bytes_per_image"] * profile["batch_size"],
            "total": profile["train_memory_bytes"], "trainable_params": profile["trainable_params"],
            "total_params": profile["total_params"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "paper_bsr.yaml"))
    parser.add_argument("--shares", nargs="*", type=float, default=[0.154, 0.3])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--name", default="deit_s", help="writes bench/results/plan_<name>.{json,md}, plan_<name>/")
    parser.add_argument("--merge", action="store_true", help="keep the other shares' results of an earlier run")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from moebsr.analysis.profiling import profile_config
    from moebsr.config import load_config
    from moebsr.planning import parse_budget
    from moebsr.planning.plan import run_plan

    out = Path(args.out)
    name = f"plan_{args.name}"
    full = profile_config(load_config(args.config, [*overrides(args), "bsr.preset=all", "bsr.trainable_blocks=null"]),
                          steps=1, warmup=1)
    results = {"config": Path(args.config).name, "overrides": overrides(args), "full": breakdown(full),
               "full_train_flops": full["train_flops_per_image"] * args.batch_size, "plans": {}}
    if args.merge and (out / f"{name}.json").is_file():
        earlier = json.loads((out / f"{name}.json").read_text())
        if earlier["overrides"] != results["overrides"] or earlier["config"] != results["config"]:
            raise SystemExit(f"--merge: {name}.json was made with {earlier['config']} {earlier['overrides']}; "
                             f"this run has {results['config']} {results['overrides']}")
        results["plans"] = {share: plan for share, plan in earlier["plans"].items()
                            if share_value(share) not in args.shares}
    for share in args.shares:
        started = time.process_time()
        report = run_plan(load_config(args.config, overrides(args)), parse_budget(f"memory={share}x"), 2,
                          out / name / f"memory_{share:g}x.yaml", levers="auto")
        planning_s = time.process_time() - started
        planned = load_config(out / name / f"memory_{share:g}x.yaml")
        profiled = profile_config(planned, steps=RUN_TIMED_STEPS, warmup=1)
        run_cpu_s = profiled["step_cpu_time_s"] * planned.train.grad_accum_steps * planned.train.steps
        predicted = report["predicted"]
        results["plans"][f"{share:g}x"] = {
            "plan": report["plan"], "levers": report["levers"], "planning_cpu_s": planning_s,
            "measured_steps": report["measured_steps"], "planning_memory_bytes": report["planning_memory_bytes"],
            "planning_memory": report["planning_memory"], "importance_micro_batch": report["importance_micro_batch"],
            "predicted": predicted, "profiled": breakdown(profiled),
            "run": {"steps": planned.train.steps, "micro_steps_per_step": planned.train.grad_accum_steps,
                    "step_cpu_s": profiled["step_cpu_time_s"], "cpu_s": run_cpu_s,
                    "planning_share": planning_s / run_cpu_s},
            "predicted_over_profiled": {
                "memory": predicted["memory_bytes"] / profiled["train_memory_bytes"],
                "saved_bytes": predicted["saved_bytes"] / (profiled["saved_activation_bytes_per_image"]
                                                           * profiled["batch_size"]),
                "flops": predicted["flops"] / (profiled["train_flops_per_image"] * profiled["batch_size"])},
            "profiled_memory_ratio_to_full": profiled["train_memory_bytes"] / full["train_memory_bytes"]}
        print(json.dumps(results["plans"][f"{share:g}x"], indent=1), flush=True)
        results["plans"] = dict(sorted(results["plans"].items(), key=lambda item: share_value(item[0])))
        (out / f"{name}.json").write_text(json.dumps(results, indent=2))  # after each share: a long benchmark
        (out / f"{name}.md").write_text(format_table(results) + "\n")
    print(format_table(results))


def format_table(results: dict) -> str:
    mib = 2 ** 20
    full = results["full"]
    lines = ["| budget | plan | levers | profiled memory (MiB) | x of full | predicted / profiled: memory, saved, "
             "FLOPs | planning CPU s (steps measured) | planning pass held (MiB): measuring, scoring | "
             "the run it plans: steps x CPU s per step = CPU s | planning / run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for share, plan in results["plans"].items():
        ratio = plan["predicted_over_profiled"]
        levers = ", ".join(f"{key.split('.')[-1]}={value}" for key, value in plan["levers"].items())
        lines.append(f"| memory={share} | {plan['plan']} | {levers} | {plan['profiled']['total'] / mib:.1f} | "
                     f"{plan['profiled_memory_ratio_to_full']:.3f} | {ratio['memory']:.4f}, {ratio['saved_bytes']:.4f},"
                     f" {ratio['flops']:.4f} | {plan['planning_cpu_s']:.0f} ({plan['measured_steps']}) | "
                     f"{plan['planning_memory']['measuring'] / mib:.1f}, {plan['planning_memory']['scoring'] / mib:.1f}"
                     f"{' (bf16 weights)' if plan['planning_memory']['scoring_low_precision'] else ''} | "
                     + (f"{run['steps'] * run['micro_steps_per_step']:,} x {run['step_cpu_s']:.3f} = "
                        f"{run['cpu_s']:,.0f} | {run['planning_share'] * 100:.2f} % |"
                        if (run := plan.get("run")) else "not timed | |"))
    lines += ["", "Memory breakdown (MiB): parameters, gradients, optimizer state, saved activations, total:"]
    rows = [("full fine-tuning", full)] + [(f"plan {share}", plan["profiled"])
                                           for share, plan in results["plans"].items()]
    for name, parts in rows:
        lines.append(f"- {name}: " + ", ".join(f"{parts[key] / mib:.1f}" for key in
                                               ("parameters", "gradients", "optimizer_state", "saved_activations",
                                                "total")) + f" ({parts['trainable_params']:,} of "
                                                            f"{parts['total_params']:,} parameters train)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
