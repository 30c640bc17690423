"""Reproduce the committed backbone: pretrain ``configs/pretrain.yaml`` and store its weights in fp16.

    python scripts/pretrain_backbone.py                      # ~17 min on 2 CPU cores; writes backbones/...
    python scripts/pretrain_backbone.py --out /tmp/b.safetensors --compare backbones/formula_vit_6x128_28px.safetensors
    python scripts/pretrain_backbone.py --config configs/pretrain.yaml train.steps=500 --out /tmp/b.safetensors

Bit for bit only with the same CPU kernels and thread count: a CPU matmul sums in an order that depends on how many
threads share it (the same 40 steps on 1 and on 2 threads differ by 2.5e-5). So the training runs on ``--threads``
threads (default 2, what the committed 6-block file was made with), and the file records them, torch's version and the
CPU's kernel family (``torch.backends.cpu.get_cpu_capability()``) in its metadata.

The fp16 file is what the quickstart and the benchmarks load (``model.checkpoint``); timm loads it too:
``timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, img_size=28, patch_size=7, depth=6,
embed_dim=128, num_heads=4, pretrained_cfg_overlay=dict(file=...))``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "backbones" / "formula_vit_6x128_28px.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "pretrain.yaml"))
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="fp16 safetensors file to write")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads the training runs on (see above)")
    parser.add_argument("--compare", default=None, help="a backbone to check the new file against, bit for bit")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the pretraining config")
    args = parser.parse_args()
    if args.threads < 1:
        raise SystemExit(f"--threads: {args.threads} is invalid; accepted: 1 or more")
    sys.path.insert(0, str(REPO))
    from moebsr.config import load_config
    config = load_config(args.config, args.overrides)
    threads = str(args.threads)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS=threads,
               MKL_NUM_THREADS=threads)
    # a rebuild replaces an earlier pretraining run in the same folder, unless it is asked to resume one
    fresh = [] if any(o.startswith("train.resume=") for o in args.overrides) else ["train.overwrite=true"]
    subprocess.run([sys.executable, str(REPO / "launch" / "multitask.py"), "--config", args.config, *fresh,
                    *args.overrides], check=True, env=env, cwd=REPO)
    run = Path(config.train.output_dir)
    run = run if run.is_absolute() else REPO / run
    state = {name: tensor.to(torch.float16) for name, tensor in load_file(str(run / "backbone.safetensors")).items()}
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    metadata = {"format": "pt", "library": "moebsr", "pretrain_config": Path(args.config).name,
                "overrides": " ".join(args.overrides), "pretrain_metrics": json.dumps(metrics), "threads": threads,
                "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, args.out, metadata=metadata)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {sum(t.numel() for t in state.values()):,} parameters, {size / 2 ** 20:.1f} MiB fp16; "
          f"pretraining test metrics {metrics}")
    if args.compare:
        compare(state, Path(args.compare))


def compare(state: dict[str, torch.Tensor], committed: Path) -> None:
    """Say whether ``state`` equals the backbone in ``committed`` bit for bit; exit 1 when it does not."""
    reference = load_file(str(committed))
    if set(reference) != set(state):
        raise SystemExit(f"{committed}: other tensor names ({len(reference)} against {len(state)})")
    differ = [name for name in state if not torch.equal(state[name], reference[name])]
    if differ:
        largest = max((state[n].float() - reference[n].float()).abs().max().item() for n in differ)
        raise SystemExit(f"{committed}: {len(differ)} of {len(state)} tensors differ (largest difference {largest:.3g}"
                         f", e.g. {differ[0]}); made with {load_metadata(committed)}")
    print(f"{committed}: equal bit for bit ({len(state)} tensors)")


def load_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as handle:
        return {key: value for key, value in (handle.metadata() or {}).items() if key != "pretrain_metrics"}


if __name__ == "__main__":
    main()
