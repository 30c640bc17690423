"""The README's main job and its full fine-tuning twin, as a user runs them: per-task test metrics and time.

    python bench/quickstart.py                 # both configs, one after the other (~10 min on 2 CPU cores)
    python bench/quickstart.py --configs quickstart

Each config runs as the README's first command does (``accelerate launch launch/multitask.py --config ...``), into a
temporary folder; measured: the run's ``metrics.json`` (test split), the wall time of the launch and the CPU time of
its processes (less sensitive to a shared machine than the wall time). Writes ``bench/results/quickstart.json`` and
``quickstart.md``, which the docs include.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("quickstart", "quickstart_full")


def run_config(name: str, folder: Path) -> dict:
    """One launch of ``configs/NAME.yaml``; its metrics, wall seconds and CPU seconds."""
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "launch/multitask.py", "--config", f"configs/{name}.yaml",
               f"train.output_dir={folder / name}", "logging.progress=false"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    metrics = json.loads((folder / name / "metrics.json").read_text())["metrics"]
    return {"config": f"configs/{name}.yaml", "metrics": metrics, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "mean_top1": sum(task["top1"] for task in metrics.values()) / len(metrics)}


def format_markdown(results: dict[str, dict]) -> str:
    tasks = list(next(iter(results.values()))["metrics"])
    lines = ["Quickstart runs (`python bench/quickstart.py`: `accelerate launch launch/multitask.py --config ...`, "
             "test split, top-1 %)", "",
             "| config | " + " | ".join(tasks) + " | mean | wall | CPU |",
             "|---|" + "---|" * (len(tasks) + 3)]
    for result in results.values():
        cells = [f"{100 * result['metrics'][task]['top1']:.2f}" for task in tasks]
        lines.append(f"| {result['config']} | " + " | ".join(cells) + f" | {100 * result['mean_top1']:.2f} | "
                     f"{result['wall_s'] / 60:.1f} min | {result['cpu_s'] / 60:.1f} min |")
    lines.append("")
    if len(results) == 2:
        bsr, full = (results[name] for name in CONFIGS)
        lines.append(f"BSR + token dropping against full fine-tuning in this one run: "
                     f"{100 * (bsr['mean_top1'] - full['mean_top1']):+.2f} points of mean top-1, "
                     f"{full['cpu_s'] / bsr['cpu_s']:.2f}x less CPU time.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = {name: run_config(name, Path(folder)) for name in args.configs}
    out = Path(args.out)
    (out / "quickstart.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "quickstart.md").write_text(format_markdown(results))
    print(format_markdown(results))


if __name__ == "__main__":
    main()
