"""A backbone's quality figure: linear-probe top-1 on each downstream task, from its frozen features.

Every image of a task's train split goes once through the frozen backbone (eval mode, no augmentation); a
multinomial logistic regression (scikit-learn, L2, features standardised on the train split) is fit on the pooled
features and scored on the test split. Both poolings are reported: the CLS token (what a linear head on the
MoE-ViT sees) and the mean of the patch tokens.

    python bench/linear_probe.py backbones/formula_vit_6x128_28px.safetensors random
    python bench/linear_probe.py CANDIDATE.safetensors ... --tasks mnist digits animals --json out.json
    python bench/linear_probe.py backbones/formula_vit_12x128_28px.safetensors random --depth 12
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import timm
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recipes import backbone_arch  # noqa: E402 (after the sys.path line above)

ARCH = backbone_arch()  # the quickstart's backbone
DOWNSTREAM = ["mnist", "digits", "animals"]  # the parity tasks label the same images


def load_backbone(checkpoint: str) -> torch.nn.Module:
    """``random`` gives the untrained network (the floor every pretraining must beat)."""
    torch.manual_seed(0)
    if checkpoint == "random":
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **ARCH).eval()
    return timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, **ARCH,
                             pretrained_cfg_overlay=dict(file=str(checkpoint))).eval()


@torch.no_grad()
def features(backbone: torch.nn.Module, images: torch.Tensor, pooling: str, batch: int = 500) -> np.ndarray:
    from moebsr.data import ImageSpec
    from moebsr.data.batch_ops import to_model_batch
    spec = ImageSpec(ARCH["img_size"], 3)
    pooled = []
    for start in range(0, len(images), batch):
        tokens = backbone.forward_features(to_model_batch(images[start:start + batch], spec))
        pooled.append(tokens[:, 0] if pooling == "cls" else tokens[:, backbone.num_prefix_tokens:].mean(1))
    return torch.cat(pooled).numpy()


def probe(checkpoint: str, tasks: list[str]) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression

    from moebsr.tasks import create_task, discover_tasks
    discover_tasks()
    backbone = load_backbone(checkpoint)
    results = {}
    for name in tasks:
        task = create_task(name)
        train, test = task.build_dataset("train"), task.build_dataset("test")
        for pooling in ("cls", "mean"):
            train_x, test_x = features(backbone, train.images, pooling), features(backbone, test.images, pooling)
            mean, std = train_x.mean(0), train_x.std(0) + 1e-6
            classifier = LogisticRegression(max_iter=3000).fit((train_x - mean) / std, train.labels.numpy())
            results[f"{name}/{pooling}"] = float(classifier.score((test_x - mean) / std, test.labels.numpy()))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="backbone safetensors files, or 'random'")
    parser.add_argument("--tasks", nargs="*", default=DOWNSTREAM)
    parser.add_argument("--img-size", type=int, default=ARCH["img_size"])
    parser.add_argument("--patch-size", type=int, default=ARCH["patch_size"])
    parser.add_argument("--depth", type=int, default=ARCH["depth"], help="blocks (12 for the 12-block backbone)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    ARCH.update(img_size=args.img_size, patch_size=args.patch_size, depth=args.depth)
    table = {checkpoint: probe(checkpoint, args.tasks) for checkpoint in args.checkpoints}
    columns = list(next(iter(table.values())))
    print("| backbone | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for checkpoint, results in table.items():
        print(f"| {Path(checkpoint).name} | " + " | ".join(f"{results[c] * 100:.1f}" for c in columns) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
