"""Low-rank experts (``moe.expert_rank``) against whole-copy experts: what each recipe's training memory becomes,
one change at a time, and (on the quickstart backbone) the accuracy it keeps.

1. Quickstart backbone, the accuracy benchmark's recipes (``bench/recipes.py``): ``paper_bsr`` and ``lean`` each
   against its ``*_low_rank`` twin (the same recipe with ``moe.expert_rank=8``), full fine-tuning as the reference.
   Memory is ``moebsr profile``'s instrument (parameters + gradients + optimizer state + saved activations) at the
   recipe's batch; accuracy is read from ``bench/results/accuracy_quickstart.json`` (``bench/accuracy.py``, 3 seeds,
   learning rate picked on held-out training data), so run that first for the rows to have it.
2. DeiT-S, ``configs/paper_bsr.yaml`` and ``configs/paper_lean.yaml`` at batch 16 in bf16 (random weights: no
   pretrained DeiT-S can be downloaded here; memory does not depend on them), each with ``moe.expert_rank`` null and
   8, against full fine-tuning of the same model (``bsr.preset=all``, no dropping).

Run on one thread:

    OMP_NUM_THREADS=1 python bench/expert_rank.py            # both parts (~10 min on one core)
    OMP_NUM_THREADS=1 python bench/expert_rank.py --skip-deit-s

Writes ``bench/results/expert_rank.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))
from recipes import BASE_CONFIG, recipe_overrides  # noqa: E402

TASKS = ["mnist", "mnist_parity", "digits", "digits_parity", "animals"]
RANK = 8
QUICKSTART_PAIRS = [("paper_bsr", "paper_bsr_low_rank"), ("lean", "lean_low_rank")]
DEIT_S_CONFIGS = ["paper_bsr", "paper_lean"]
MIB = 2 ** 20


def memory_row(report: dict) -> dict:
    """The training-memory breakdown of a ``moebsr profile`` report, in MiB (saved activations for the batch)."""
    saved = report["saved_activation_bytes_per_image"] * report["batch_size"]
    return {"train_memory_mib": report["train_memory_bytes"] / MIB, "parameters_mib": report["parameter_bytes"] / MIB,
            "gradients_mib": report["gradient_bytes"] / MIB, "optimizer_mib": report["optimizer_state_bytes"] / MIB,
            "saved_activations_mib": saved / MIB, "trainable_params": report["trainable_params"],
            "train_gflops_per_image": report["train_flops_per_image"] / 1e9}


def profile(config_path: Path, overrides: list[str]) -> dict:
    from moebsr.analysis.profiling import profile_config
    from moebsr.config import load_config
    return memory_row(profile_config(load_config(config_path, overrides), steps=1, warmup=1))


def quickstart_rows() -> dict:
    accuracy_file = REPO / "bench" / "results" / "accuracy_quickstart.json"
    accuracy = json.loads(accuracy_file.read_text())["recipes"] if accuracy_file.is_file() else {}
    rows = {}
    for recipe in ["full", *[name for pair in QUICKSTART_PAIRS for name in pair]]:
        overrides = recipe_overrides("quickstart", recipe) + [f"tasks=[{','.join(TASKS)}]", "logging.trackers=[none]"]
        rows[recipe] = profile(BASE_CONFIG, overrides)
        summary = accuracy.get(recipe, {}).get("summary", {}).get("mean")
        rows[recipe]["mean_top1"] = summary  # None until bench/accuracy.py has run the recipe
    return rows


def deit_s_rows() -> dict:
    common = ["model.pretrained=false", "train.batch_size=16", "train.mixed_precision=bf16",
              f"tasks=[{','.join(TASKS)}]", "logging.trackers=[none]", "data.num_workers=0"]
    rows = {"full": profile(REPO / "configs" / "paper_bsr.yaml",
                            [*common, "bsr.preset=all", "bsr.trainable_blocks=null", "token_drop.enabled=false"])}
    for name in DEIT_S_CONFIGS:
        for rank in (None, RANK):
            label = name if rank is None else f"{name} + expert_rank={rank}"
            rows[label] = profile(REPO / "configs" / f"{name}.yaml",
                                  [*common, f"moe.expert_rank={'null' if rank is None else rank}"])
    return rows


def format_rows(rows: dict, with_accuracy: bool) -> str:
    full = rows["full"]
    header = ("| recipe | train memory (MiB) | x less than full | parameters | gradients | optimizer state | "
              "saved activations | trainable params | train GFLOP/image |")
    lines = [header + (" mean top-1 (3 seeds) | vs full |" if with_accuracy else ""),
             "|" + "---|" * (9 + 2 * with_accuracy)]
    for name, row in rows.items():
        line = (f"| {name} | {row['train_memory_mib']:.1f} | {full['train_memory_mib'] / row['train_memory_mib']:.2f} "
                f"| {row['parameters_mib']:.1f} | {row['gradients_mib']:.1f} | {row['optimizer_mib']:.1f} | "
                f"{row['saved_activations_mib']:.1f} | {row['trainable_params']:,} | "
                f"{row['train_gflops_per_image']:.3f} |")
        if with_accuracy:
            top1 = row["mean_top1"]
            if top1 is None:
                line += " not run | — |"
            else:
                difference = ("—" if name == "full" else
                              f"{100 * (top1['mean'] - full['mean_top1']['mean']):+.2f} pt")
                line += f" {100 * top1['mean']:.2f} ± {100 * top1['std']:.2f} | {difference} |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-deit-s", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    results = {"rank": RANK, "quickstart": quickstart_rows()}
    sections = ["Quickstart backbone (6 blocks), the accuracy benchmark's recipes at batch 64, fp32; accuracy from "
                "`bench/accuracy.py train.steps=600` (5 offline tasks, 3 seeds):", "",
                format_rows(results["quickstart"], with_accuracy=True)]
    if not args.skip_deit_s:
        results["deit_s"] = deit_s_rows()
        sections += ["", "DeiT-S (random weights), batch 16, bf16 autocast:", "",
                     format_rows(results["deit_s"], with_accuracy=False)]
    (out / "expert_rank.json").write_text(json.dumps(results, indent=2))
    table = "\n".join(sections)
    (out / "expert_rank.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
