"""Masked image modelling (SimMIM, Xie et al. 2022) on the fractal pool: the self-supervised backbone candidate.

The same dense ViT as ``configs/pretrain.yaml`` (6 blocks, width 128, 28 px, patch 7) sees the same generated
images (its contours and fractals), without their labels: 60 % of the patches are replaced by a learned mask
token and a linear decoder predicts their (per-patch normalised) pixels, L1 loss on the masked patches only,
for as many steps of the same batch as the supervised candidate. Written in timm's layout (fp16), so
``model.checkpoint`` loads it like the supervised one.

    python bench/mim_pretrain.py --steps 6000 --out /tmp/mim.safetensors
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recipes import PRETRAIN_CONFIG, backbone_arch  # noqa: E402 (after the sys.path line above)

ARCH = backbone_arch()


class SimMIM(nn.Module):
    def __init__(self, mask_ratio: float = 0.6) -> None:
        super().__init__()
        self.encoder = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, in_chans=1, **ARCH)
        dim, patch = self.encoder.embed_dim, ARCH["patch_size"]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Linear(dim, patch * patch)
        self.mask_ratio = mask_ratio

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        encoder, patch = self.encoder, ARCH["patch_size"]
        tokens = encoder.patch_embed(images)  # [B, P, C]
        batch, num_patches, _ = tokens.shape
        masked = torch.rand(batch, num_patches, device=images.device).argsort(1) < int(self.mask_ratio * num_patches)
        tokens = torch.where(masked[..., None], self.mask_token.expand(batch, num_patches, -1), tokens)
        x = encoder.norm(encoder.blocks(encoder.norm_pre(encoder._pos_embed(tokens))))
        predicted = self.decoder(x[:, encoder.num_prefix_tokens:])  # [B, P, patch*patch]
        target = F.unfold(images, patch, stride=patch).transpose(1, 2)  # [B, P, patch*patch]
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        return (F.l1_loss(predicted, target, reduction="none").mean(-1) * masked).sum() / masked.sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from moebsr.config import load_config
    from moebsr.tasks import create_task, discover_tasks
    discover_tasks()
    config = load_config(PRETRAIN_CONFIG)  # the supervised candidate's pool, labels unused
    images = torch.cat([create_task(name, **config.data.task_options.get(name, {})).build_dataset("train").images
                        for name in config.tasks])
    torch.manual_seed(0)
    model = SimMIM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, args.steps - warmup))))))
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for step in range(args.steps):
        index = torch.randint(0, len(images), (args.batch_size,), generator=generator)
        batch = (images[index].float() / 255.0 - 0.5) / 0.5
        batch = torch.where(torch.rand(args.batch_size, 1, 1, 1, generator=generator) < 0.5, batch.flip(-1), batch)
        loss = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 200 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.encoder.state_dict().items()}
    # the supervised backbone takes 3-channel input (grey repeated): fold the 1-channel stem into 3 channels
    state["patch_embed.proj.weight"] = (state["patch_embed.proj.weight"].float() / 3).repeat(1, 3, 1, 1).half()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, args.out, metadata={"format": "pt", "library": "moebsr", "objective": "simmim",
                                         "steps": str(args.steps)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
