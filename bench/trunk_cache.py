"""What the frozen-trunk cache saves, and what its augmentation policy costs: epoch time and accuracy, side by side.

For each recipe (default: ``lean`` and ``bsr_last_3``, whose frozen prefix is half the quickstart model) and seed, the
same fine-tuning run as ``bench/accuracy.py`` (five offline tasks, joint sampler, batch 64, the recipe's learning rate
from ``bench/results/accuracy_quickstart.json``) is trained three ways, one after the other:

- ``off``: no cache, a new random augmentation every epoch (the accuracy benchmark's run);
- ``cache_views0``: ``trunk_cache.enabled=true``, augmentation off while cached;
- ``cache_views2``: the same with 2 fixed augmented views per image (epoch e shows view e mod 2).

Reported per run, from its ``train_log.jsonl`` (every step's clocks) and ``metrics.json``: training time, the time of
an epoch after every loader's first one (the cache full for ``views0``), the share of images read back, and test
top-1. Times are the run's CPU seconds (one thread: another job on the machine does not inflate them, as it does the
wall clock, shown beside them).

    python bench/trunk_cache.py train.steps=600                       # docs/results (~1 h on 2 CPU cores)
    python bench/trunk_cache.py train.steps=600 --recipes lean         # one recipe: its rows replace, others stay
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from recipes import RECIPES, REPO, cached_run, recipe_overrides

TASKS = ["mnist", "mnist_parity", "digits", "digits_parity", "animals"]
SETTINGS = {"off": [], "cache_views0": ["trunk_cache.enabled=true", "trunk_cache.views=0"],
            "cache_views2": ["trunk_cache.enabled=true", "trunk_cache.views=2"]}
# the joint sampler rotates three loaders (mnist pair, digits pair, animals); animals' 8,000 images in batches of 64
# take 125 of every third step: after step 375 every loader is past its first epoch
FIRST_EPOCH_STEPS = 375


def run(recipe: str, setting: str, seed: int, lr: float, args: argparse.Namespace) -> dict:
    output = Path(args.out) / "trunk_cache_runs" / recipe / f"{setting}-seed{seed}"
    overrides = recipe_overrides("quickstart", recipe) + [
        f"tasks=[{','.join(TASKS)}]", f"train.lr={lr}", f"train.seed={seed}", f"train.output_dir={output}",
        "train.checkpoint_every=0", "logging.trackers=[none]", "logging.progress=false", *SETTINGS[setting],
        *args.overrides]
    cached_run(output, overrides, f"{recipe}: {setting} seed {seed}", threads=args.threads)
    return summarise(output)


def summarise(output: Path) -> dict:
    """Times from the log's clocks: ``cpu_s`` (this one-thread process's CPU time, which another job on the machine
    does not inflate) for the ratios, ``elapsed_s`` (wall clock) beside it."""
    records = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    metrics = json.loads((output / "metrics.json").read_text())["metrics"]
    read_back = re.search(r"(\d+)% of the images read back", (output / "stdout.txt").read_text())
    summary = {"read_back": int(read_back.group(1)) / 100 if read_back else 0.0,
               "top1": {task: metrics[task]["top1"] for task in TASKS},
               "mean_top1": statistics.mean(metrics[task]["top1"] for task in TASKS)}
    for clock in ("cpu_s", "elapsed_s"):
        times = [record[clock] for record in records]
        later = times[-1] - times[FIRST_EPOCH_STEPS - 1]
        summary[clock] = {"train": times[-1], "first_epoch": times[FIRST_EPOCH_STEPS - 1],
                          "later_epoch": later / (len(times) - FIRST_EPOCH_STEPS) * FIRST_EPOCH_STEPS}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", default=["lean", "bsr_last_3"], choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. train.steps=600")
    args = parser.parse_args()
    chosen = json.loads((Path(args.out) / "accuracy_quickstart.json").read_text())["recipes"]
    results: dict = {"settings": SETTINGS, "seeds": args.seeds, "overrides": args.overrides, "recipes": {}}
    for recipe in args.recipes:
        lr = chosen[recipe]["lr"]  # the accuracy benchmark's validation-picked rate, for every setting
        runs = {setting: [run(recipe, setting, seed, lr, args) for seed in args.seeds] for setting in SETTINGS}
        results["recipes"][recipe] = {"lr": lr, "runs": runs}
    out = Path(args.out)
    path = out / "trunk_cache_quickstart.json"
    if path.is_file():  # a run of some recipes replaces their rows and keeps the others of the same settings
        earlier = json.loads(path.read_text())
        if all(earlier.get(key) == results[key] for key in ("settings", "seeds", "overrides")):
            results["recipes"] = {**earlier["recipes"], **results["recipes"]}
    path.write_text(json.dumps(results, indent=2))
    table = format_table(results)
    (out / "trunk_cache_quickstart.md").write_text(table + "\n")
    print(table)


def format_table(results: dict) -> str:
    steps = ", ".join(results["overrides"]) or "default steps"
    lines = [f"Quickstart model, five tasks, {steps}; mean ± std over seeds {results['seeds']}; an epoch = "
             f"{FIRST_EPOCH_STEPS} steps (every loader once); times in CPU seconds of the one-thread run (wall clock "
             "in brackets).", "",
             "| recipe | setting | mean top-1 | vs off | training s | first epoch s | later epoch s | later epoch x | "
             "read back |", "|---|---|---|---|---|---|---|---|---|"]

    def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
        values = [v * scale for v in values]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"

    def clocks(runs: list[dict], key: str) -> str:
        return (f"{spread([r['cpu_s'][key] for r in runs], digits=0)} "
                f"({statistics.mean(r['elapsed_s'][key] for r in runs):.0f})")
    for recipe, entry in results["recipes"].items():
        base = entry["runs"]["off"]
        for setting, runs in entry["runs"].items():
            top1 = [r["mean_top1"] for r in runs]
            delta = statistics.mean(top1) - statistics.mean(r["mean_top1"] for r in base)
            speedup = [b["cpu_s"]["later_epoch"] / r["cpu_s"]["later_epoch"] for b, r in zip(base, runs)]
            lines.append(f"| {recipe} | {setting} | {spread(top1, 100)} | {delta * 100:+.2f} pt | "
                         f"{clocks(runs, 'train')} | {clocks(runs, 'first_epoch')} | {clocks(runs, 'later_epoch')} | "
                         f"{spread(speedup)} | {statistics.mean(r['read_back'] for r in runs):.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
