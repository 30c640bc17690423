"""Accuracy of fine-tuning recipes on real offline data, from a backbone moebsr pretrained itself.

Protocol (no pretrained weights can be downloaded here): ``configs/pretrain.yaml`` trains the quickstart's dense
ViT fully on ``animals`` (animal-shape-mnist, 8,000 training images) and exports it; every recipe then fine-tunes
that backbone, upcycled to the same MoE-ViT, on the *other* shipped tasks (``mnist``, ``mnist_parity``,
``digits``) with the same seed, steps, batch, learning rate and sampler, and is evaluated on their full test splits.

    python bench/accuracy.py                                  # full vs paper_bsr (about 10 min on 2 CPU cores)
    python bench/accuracy.py --recipes full paper_bsr last_3 lora_paper_blocks --steps 300

Writes ``bench/results/accuracy_quickstart.json`` (read by ``bench/compare.py --size quickstart`` for its plot).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from recipes import BASE_CONFIG, RECIPES, REPO, recipe_overrides

TASKS = "tasks=[mnist,mnist_parity,digits]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", default=["full", "paper_bsr"], choices=list(RECIPES))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    runs = Path(args.out) / "accuracy_runs"
    results: dict = {"protocol": __doc__.split("\n\n")[1].replace("\n", " "), "steps": args.steps, "lr": args.lr,
                     "seed": args.seed, "per_task": {}, "mean_top1": {}, "wall_s": {}}
    for recipe in args.recipes:
        overrides = recipe_overrides("quickstart", recipe) + [
            TASKS, f"train.steps={args.steps}", f"train.lr={args.lr}", f"train.seed={args.seed}",
            f"train.output_dir={runs / recipe}", "train.checkpoint_every=0", "logging.trackers=[none]",
            "logging.progress=false"]
        print(f"fine-tuning {recipe} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "launch" / "multitask.py"), "--config", str(BASE_CONFIG),
                        *overrides], check=True, env=env, cwd=REPO)
        results["wall_s"][recipe] = time.perf_counter() - started
        metrics = json.loads((runs / recipe / "metrics.json").read_text())["metrics"]
        results["per_task"][recipe] = {task: values["top1"] for task, values in metrics.items()}
        results["mean_top1"][recipe] = sum(results["per_task"][recipe].values()) / len(metrics)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy_quickstart.json").write_text(json.dumps(results, indent=2))
    tasks = list(next(iter(results["per_task"].values())))
    print("| recipe | " + " | ".join(tasks) + " | mean | vs full |")
    print("|---|" + "---|" * (len(tasks) + 2))
    for recipe, per_task in results["per_task"].items():
        delta = (results["mean_top1"][recipe] - results["mean_top1"].get("full", float("nan"))) * 100
        print(f"| {recipe} | " + " | ".join(f"{per_task[t] * 100:.2f}" for t in tasks)
              + f" | {results['mean_top1'][recipe] * 100:.2f} | {delta:+.2f} pt |")


if __name__ == "__main__":
    main()
