"""Side-by-side cost of fine-tuning recipes on the same MoE-ViT, batch and run; ratios against full fine-tuning.

    python bench/compare.py                       # default: ViT-Tiny, 12 blocks, 32 px, batch 32, CPU, minutes
    python bench/compare.py --size quickstart --batch-size 64   # the quickstart model (and bench/accuracy.py's)
    python bench/compare.py --size deit_s --batch-size 8       # DeiT-S at 224 px (the paper's model)
    python bench/compare.py --size vit_b --batch-size 128 --device cuda

Every recipe is profiled by ``moebsr profile --json`` in its own process (peak memory is only honest in a fresh
process), in one run, on the same model, batch and synthetic data. Writes ``<out>/compare.json``, ``.csv``, a
markdown table and ``compare.png`` (memory and FLOPs, with accuracy from ``bench/accuracy.py`` when present).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from recipes import BASE_CONFIG, RECIPES, REPO, SIZES, recipe_overrides

RATIO_KEYS = ("train_flops_per_image", "saved_activation_bytes_per_image", "train_memory_bytes",
              "peak_memory_bytes", "step_time_s", "step_cpu_time_s")
# how the paper BSR model routes, for the joint-batch measurement: its recipe on top of recipes.py's COMMON
JOINT_ROUTERS = {"router `task`": "paper_bsr", "router `task` in the last MoE block only": "paper_bsr_last_task_gate",
                 "router `shared`": "paper_bsr_shared_gate"}
TARGETS = {"train_flops_per_image": 3.0, "saved_activation_bytes_per_image": 6.0, "train_memory_bytes": 2.5,
           "peak_memory_bytes": 2.5, "step_time_s": 2.5, "step_cpu_time_s": 2.5}


def profile(overrides: list[str], args: argparse.Namespace, tasks_per_step: int | None = None) -> dict:
    command = [sys.executable, "-m", "moebsr.cli", "profile", "--config", str(BASE_CONFIG), "--json",
               "--steps", str(args.steps), "--warmup", str(args.warmup), *overrides]
    if args.device:
        command += ["--device", args.device]
    if tasks_per_step:
        command += ["--tasks-per-step", str(tasks_per_step)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"profile failed for {overrides}:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per recipe (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--joint-tasks", type=int, default=4, help="measure joint batches of 1..N tasks")
    parser.add_argument("--repeats", type=int, default=1,
                        help="profile the whole recipe sequence N times in rotation; timings are the median")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per profile (default: torch's); with 1, the step's CPU time is its "
                             "compute, which other jobs on a shared machine do not inflate")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("overrides", nargs="*", help="config overrides for every recipe, e.g. train.optimizer=sgd")
    args = parser.parse_args()

    base = ["model.checkpoint=null", f"train.batch_size={args.batch_size}", "train.sampler=round_robin",
            *args.overrides]
    rows: dict[str, dict] = {}
    timings: dict[str, list[tuple[float, float, float]]] = {name: [] for name in args.recipes}
    for repeat in range(args.repeats):  # in rotation, so a slow spell of the machine hits every recipe alike
        for name in args.recipes:
            print(f"profiling {name} ({repeat + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
            rows[name] = profile(base + recipe_overrides(args.size, name), args)
            timings[name].append((rows[name]["step_time_s"], rows[name]["infer_images_per_s"],
                                  rows[name]["step_cpu_time_s"]))
    for name, measured in timings.items():
        rows[name]["step_time_s"] = statistics.median(t for t, _, _ in measured)
        rows[name]["infer_images_per_s"] = statistics.median(r for _, r, _ in measured)
        rows[name]["step_cpu_time_s"] = statistics.median(c for _, _, c in measured)
        rows[name]["repeats_step_time_s"] = [t for t, _, _ in measured]
    joint: dict[str, dict[int, float]] = {}
    joint_cpu: dict[str, dict[int, float]] = {}
    joint_flops: dict[str, dict[int, float]] = {}  # training FLOPs of the joint step: the noise-free twin of its time
    if args.joint_tasks > 1:
        four_tasks = ["tasks=[mnist,mnist_parity,digits,animals]"]
        for router in JOINT_ROUTERS:
            samples: dict[int, list[tuple[float, float]]] = {}
            for repeat in range(args.repeats):
                for count in range(1, args.joint_tasks + 1):
                    print(f"profiling joint batch of {count} task(s), {router} ...", file=sys.stderr, flush=True)
                    overrides = base + recipe_overrides(args.size, JOINT_ROUTERS[router]) + four_tasks
                    report = profile(overrides, args, count)
                    samples.setdefault(count, []).append((report["step_time_s"], report["step_cpu_time_s"]))
                    joint_flops.setdefault(router, {})[count] = report["train_flops_per_image"]
            joint[router] = {count: statistics.median(w for w, _ in times) for count, times in samples.items()}
            joint_cpu[router] = {count: statistics.median(c for _, c in times) for count, times in samples.items()}

    first = next(iter(rows.values()))
    results = {"size": args.size, "batch_size": args.batch_size, "overrides": args.overrides, "repeats": args.repeats,
               "device": first["device"],
               "torch_threads": first["torch_threads"], "recipes": rows, "joint_step_time_s": joint,
               "joint_step_cpu_time_s": joint_cpu, "joint_train_flops_per_image": joint_flops}
    accuracy_path = Path(args.out) / f"accuracy_{args.size}.json"
    if accuracy_path.is_file():
        results["accuracy"] = json.loads(accuracy_path.read_text())
    write_outputs(results, Path(args.out))


def ratios_against_full(rows: dict) -> dict[str, dict[str, float]]:
    full = rows["full"]
    return {name: {key: full[key] / row[key] for key in RATIO_KEYS if row.get(key)} for name, row in rows.items()}


def write_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = results["recipes"]
    ratios = ratios_against_full(rows) if "full" in rows else {}
    results["ratios_vs_full"] = ratios
    stem = f"compare_{results['size']}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    columns = ["recipe", "trainable_params", "train_gflops_per_image", "infer_gflops_per_image",
               "saved_mib_per_image", "train_memory_mib", "peak_memory_mib", "step_time_ms", "infer_images_per_s"]
    table = []
    for name, row in rows.items():
        table.append([name, row["trainable_params"], row["train_flops_per_image"] / 1e9,
                      row["infer_flops_per_image"] / 1e9, row["saved_activation_bytes_per_image"] / 2 ** 20,
                      row["train_memory_bytes"] / 2 ** 20, row["peak_memory_bytes"] / 2 ** 20,
                      row["step_time_s"] * 1e3, row["infer_images_per_s"]])
    with open(out / f"{stem}.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(table)
    lines = [f"Size `{results['size']}`, batch {results['batch_size']}, device {results['device']}, "
             f"{results['torch_threads']} threads, timings median of {results.get('repeats', 1)} run(s) in rotation; "
             "ratios are full fine-tuning / recipe (higher = cheaper).", "",
             "| recipe | trainable params | train GFLOPs/img | saved MiB/img | train mem MiB | peak MiB | step ms | "
             "FLOPs x | saved x | train mem x | peak x | step x | step CPU x |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, name in zip(table, rows):
        r = ratios.get(name, {})
        lines.append(f"| {name} | {row[1]:,} | {row[2]:.3f} | {row[4]:.2f} | {row[5]:.0f} | {row[6]:.0f} | "
                     f"{row[7]:.0f} | " + " | ".join(f"{r.get(k, float('nan')):.2f}" for k in RATIO_KEYS) + " |")
    if "paper_bsr" in rows and "bsr_no_drop" in rows:
        drop, no_drop = rows["paper_bsr"], rows["bsr_no_drop"]
        lines += ["", f"Token dropping at inference (paper_bsr vs the same model without dropping): FLOPs "
                      f"{no_drop['infer_flops_per_image'] / drop['infer_flops_per_image']:.2f}x lower, throughput "
                      f"{drop['infer_images_per_s'] / no_drop['infer_images_per_s']:.2f}x higher "
                      f"({drop['infer_images_per_s']:.1f} vs {no_drop['infer_images_per_s']:.1f} images/s)."]
    cached = {name: row for name, row in rows.items() if row.get("cached_train_flops_per_image")}
    if cached and "full" in rows:
        full = rows["full"]
        lines += ["", "With the frozen-trunk cache (`trunk_cache.enabled`), a step whose images are all read back "
                      "skips the blocks before the first trainable one:", "",
                  "| recipe | blocks read back | train GFLOPs/img | FLOPs x | step CPU x | "
                  "vs the same recipe uncached: FLOPs x | step CPU x |", "|---|---|---|---|---|---|---|"]
        for name, row in cached.items():
            flops, cpu = row["cached_train_flops_per_image"], row["cached_step_cpu_time_s"]
            lines.append(f"| {name} | 0-{row['cached_from_block'] - 1} | {flops / 1e9:.3f} | "
                         f"{full['train_flops_per_image'] / flops:.2f} | {full['step_cpu_time_s'] / cpu:.2f} | "
                         f"{row['train_flops_per_image'] / flops:.2f} | {row['step_cpu_time_s'] / cpu:.2f} |")
    accuracy = {name: recipe["summary"]["mean"]
                for name, recipe in results.get("accuracy", {}).get("recipes", {}).items()}
    if ratios and any(name in accuracy for name in rows):
        full = accuracy.get("full", {}).get("mean")
        lines += ["", "Accuracy (`bench/accuracy.py`, mean top-1 over tasks and seeds) beside the cost ratios above:",
                  "",
                  "| recipe | mean top-1 | vs full | train FLOPs x | saved for backward x | train memory x | "
                  "peak memory x | step CPU x |", "|---|---|---|---|---|---|---|---|"]
        for name in (name for name in rows if name in accuracy):
            mean, r = accuracy[name], ratios[name]
            gap = "—" if name == "full" or full is None else f"{(mean['mean'] - full) * 100:+.2f} pt"
            lines.append(f"| {name} | {mean['mean'] * 100:.2f} ± {mean['std'] * 100:.2f} | {gap} | " + " | ".join(
                f"{r.get(key, float('nan')):.2f}" for key in RATIO_KEYS if key != "step_time_s") + " |")
    for router, times in results.get("joint_step_time_s", {}).items():
        flops = results.get("joint_train_flops_per_image", {}).get(router, {})
        cpu = results.get("joint_step_cpu_time_s", {}).get(router, {})
        scaled = ", ".join(f"T={count}: {time / times[1]:.2f}"
                           + (f" (CPU {cpu[count] / cpu[1]:.2f}, FLOPs {flops[count] / flops[1]:.2f})" if flops else "")
                           + f" (target <= {1 + 0.35 * (count - 1):.2f})" for count, time in times.items())
        lines.append(f"Joint batch step cost relative to one task, paper_bsr, {router}: {scaled}.")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, out / f"{stem}.png")


def plot(results: dict, path: Path) -> None:
    """Accuracy (from ``bench/accuracy.py``, when present) against three costs, each recipe a point, with the
    accuracy/cost frontier: the recipes no other recipe beats on both accuracy and that cost."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = results["recipes"]
    accuracy = {name: recipe["summary"]["mean"]["mean"] * 100
                for name, recipe in results.get("accuracy", {}).get("recipes", {}).items()}
    costs = (("train_flops_per_image", "training GFLOPs per image", 1e9, False),
             ("saved_activation_bytes_per_image", "MiB saved for backward per image (log)", 2 ** 20, True),
             ("train_memory_bytes", "training memory (MiB)", 2 ** 20, False))
    figure, axes = plt.subplots(1, len(costs), figsize=(17, 4.8))
    for axis, (key, label, scale, log) in zip(axes, costs):
        points = {name: (row[key] / scale, accuracy.get(name, row["step_time_s"] * 1e3)) for name, row in rows.items()
                  if not accuracy or name in accuracy}  # without an accuracy figure a recipe has no place here
        for name, (x, y) in points.items():
            axis.scatter(x, y, s=40, marker="s" if name.startswith("dense") else "o")
            axis.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if accuracy:
            frontier = pareto_frontier(points)
            axis.plot(*zip(*(points[name] for name in frontier)), color="grey", linestyle="--", linewidth=1,
                      label="frontier (no recipe cheaper and more accurate)")
            axis.legend(fontsize=7, loc="lower right")
        if log:
            axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("mean top-1 over the tasks (%, bench/accuracy.py)" if accuracy else "step time (ms)")
        axis.grid(alpha=0.3)
    figure.suptitle(f"moebsr recipes, {results['size']}, batch {results['batch_size']}, {results['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def pareto_frontier(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the (cost, accuracy) points that no other point matches or beats on both, cheapest first."""
    frontier, best = [], float("-inf")
    for name, (_, accuracy) in sorted(points.items(), key=lambda item: (item[1][0], -item[1][1])):
        if accuracy > best:
            frontier.append(name)
            best = accuracy
    return frontier


if __name__ == "__main__":
    main()
