"""``moebsr plan`` on DeiT-S (12 blocks, 224 px, MoE 16 experts top-4 at 3/7/11, dropping at 3/6/9): do its
predictions hold on a real-size model, how long does planning take, and can it meet TinyTL's 6.5x (0.154x) training
memory?

1. Profile full fine-tuning of the model (``moebsr profile``'s instrument: parameters + gradients + optimizer state +
   saved activations) at the given batch and precision.
2. ``moebsr plan --budget memory=<share>x --levers auto`` for each share, timed (CPU seconds of this process).
3. Profile each written config: predicted against profiled memory, saved bytes and FLOPs, and the memory breakdown.

No pretrained DeiT-S can be downloaded here, so the weights are random: the costs (what this measures) do not depend on
them, the importance scores (which plan wins at a budget) do. The tasks are the five offline ones, read at 224 px.

    python bench/plan_deit_s.py                       # shares 0.154 and 0.3, batch 16, bf16 autocast
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


def overrides(args: argparse.Namespace) -> list[str]:
    return [f"tasks=[{','.join(TASKS)}]", "model.pretrained=false", f"train.batch_size={args.batch_size}",
            f"train.mixed_precision={args.precision}", "logging.trackers=[none]", "data.num_workers=0", *args.overrides]


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
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from moebsr.analysis.profiling import profile_config
    from moebsr.config import load_config
    from moebsr.planning import parse_budget
    from moebsr.planning.plan import run_plan

    out = Path(args.out)
    full = profile_config(load_config(args.config, [*overrides(args), "bsr.preset=all", "bsr.trainable_blocks=null"]),
                          steps=1, warmup=1)
    results = {"config": Path(args.config).name, "overrides": overrides(args), "full": breakdown(full),
               "full_train_flops": full["train_flops_per_image"] * args.batch_size, "plans": {}}
    for share in args.shares:
        started = time.process_time()
        report = run_plan(load_config(args.config, overrides(args)), parse_budget(f"memory={share}x"), 2,
                          out / "plan_deit_s" / f"memory_{share:g}x.yaml", levers="auto")
        planning_s = time.process_time() - started
        profiled = profile_config(load_config(out / "plan_deit_s" / f"memory_{share:g}x.yaml"), steps=1, warmup=1)
        predicted = report["predicted"]
        results["plans"][f"{share:g}x"] = {
            "plan": report["plan"], "levers": report["levers"], "planning_cpu_s": planning_s,
            "measured_steps": report["measured_steps"], "planning_memory_bytes": report["planning_memory_bytes"],
            "planning_memory": report["planning_memory"], "importance_micro_batch": report["importance_micro_batch"],
            "predicted": predicted, "profiled": breakdown(profiled),
            "predicted_over_profiled": {
                "memory": predicted["memory_bytes"] / profiled["train_memory_bytes"],
                "saved_bytes": predicted["saved_bytes"] / (profiled["saved_activation_bytes_per_image"]
                                                           * profiled["batch_size"]),
                "flops": predicted["flops"] / (profiled["train_flops_per_image"] * profiled["batch_size"])},
            "profiled_memory_ratio_to_full": profiled["train_memory_bytes"] / full["train_memory_bytes"]}
        print(json.dumps(results["plans"][f"{share:g}x"], indent=1), flush=True)
        (out / "plan_deit_s.json").write_text(json.dumps(results, indent=2))  # after each share: a long benchmark
        (out / "plan_deit_s.md").write_text(format_table(results) + "\n")
    print(format_table(results))


def format_table(results: dict) -> str:
    mib = 2 ** 20
    full = results["full"]
    lines = ["| budget | plan | levers | profiled memory (MiB) | x of full | predicted / profiled: memory, saved, "
             "FLOPs | planning CPU s (steps measured) | planning pass held (MiB): measuring, scoring |",
             "|---|---|---|---|---|---|---|---|"]
    for share, plan in results["plans"].items():
        ratio = plan["predicted_over_profiled"]
        levers = ", ".join(f"{key.split('.')[-1]}={value}" for key, value in plan["levers"].items())
        lines.append(f"| memory={share} | {plan['plan']} | {levers} | {plan['profiled']['total'] / mib:.1f} | "
                     f"{plan['profiled_memory_ratio_to_full']:.3f} | {ratio['memory']:.4f}, {ratio['saved_bytes']:.4f},"
                     f" {ratio['flops']:.4f} | {plan['planning_cpu_s']:.0f} ({plan['measured_steps']}) | "
                     f"{plan['planning_memory']['measuring'] / mib:.1f}, {plan['planning_memory']['scoring'] / mib:.1f}"
                     f"{' (bf16 weights)' if plan['planning_memory']['scoring_low_precision'] else ''} |")
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
