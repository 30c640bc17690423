"""Loader throughput vs a tiny ViT's training step, images/s on this machine (CPU).

Run: HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python scripts/bench_loaders.py
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import timm
import torch
from PIL import Image

from moebsr.data import ImageSpec, build_joint_loader, build_task_loader
from moebsr.tasks import create_task


def loader_rate(make_loader, batches: int) -> float:
    loader = make_loader()
    next(iter(loader))  # warm-up: dataset build, first decode, workers start
    loader.set_epoch(1)
    started, seen = time.perf_counter(), 0
    while seen < batches * loader.batch_size:
        seen += len(loader.next_batch()["images"])
    return seen / (time.perf_counter() - started)


def step_rate(model_kwargs: dict, batch_size: int, image_size: int, steps: int = 5) -> float:
    torch.manual_seed(0)
    patch_size = 4 if image_size <= 64 else 16  # 65 tokens at 32 px, 197 at 224 px
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=image_size,
                              patch_size=patch_size, **model_kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = torch.randn(batch_size, 3, image_size, image_size), torch.randint(0, 10, (batch_size,))
    for step in range(steps + 1):
        if step == 1:
            started = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * batch_size / (time.perf_counter() - started)


def stand_in_folder(root: str, count: int = 1024) -> str:
    """A CIFAR-10-shaped parquet stand-in (32x32 PNGs, img/label columns)."""
    import datasets
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    for split in ("train", "test"):
        datasets.Dataset.from_dict({"img": pictures, "label": [i % 10 for i in range(count)]},
                                   features=features).to_parquet(f"{root}/{split}-00000-of-00001.parquet")
    return root


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ImageSpec(args.image_size, 3)
    batch = args.batch_size
    rows = []
    for name in ("animals", "mnist", "digits"):
        task = create_task(name)
        rows.append((f"{name} (tensor-cached, augmented)",
                     loader_rate(lambda: build_task_loader(task, "train", spec, batch, train=True), 40)))
    joint = [create_task("mnist"), create_task("mnist_parity")]
    rows.append(("mnist+mnist_parity joint", loader_rate(lambda: build_joint_loader(joint, "train", spec, batch,
                                                                                     train=True), 40)))
    with tempfile.TemporaryDirectory() as root:
        cifar = create_task("cifar10", data_dir=stand_in_folder(root))
        for workers in (0, 2):
            rows.append((f"cifar10 stand-in (per-image timm transform, num_workers={workers})",
                         loader_rate(lambda: build_task_loader(cifar, "train", spec, batch, train=True,
                                                               num_workers=workers), 8)))
    rows.append(("train step: ViT depth 2, width 64 (test model)",
                 step_rate(dict(depth=2, embed_dim=64, num_heads=2), batch, args.image_size)))
    rows.append(("train step: vit_tiny (12 blocks, width 192)",
                 step_rate({}, batch, args.image_size)))
    print(f"torch threads: {torch.get_num_threads()}, batch {batch}, {args.image_size} px")
    for label, rate in rows:
        print(f"{label:<64} {rate:>10.0f} images/s")


if __name__ == "__main__":
    main()
