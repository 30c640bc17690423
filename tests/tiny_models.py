"""Tiny ViTs shared by the model tests: 4 blocks, 32 px, patch 4 (65 tokens), width 64."""

from __future__ import annotations

from typing import Any

import timm
import torch

from moebsr.model import MoEViT, create_moevit

TINY_VIT = dict(img_size=32, patch_size=4, depth=4, embed_dim=64, num_heads=2)


def tiny_vit(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **{**TINY_VIT, **overrides})


def tiny_moevit(tasks: Any = None, seed: int = 0, **kwargs: Any) -> MoEViT:
    torch.manual_seed(seed)
    kwargs.setdefault("moe", dict(num_experts=4, top_k=2))
    return create_moevit("vit_tiny_patch16_224", tasks or {"a": 10, "b": 3}, **{**TINY_VIT, **kwargs})


def images(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def distinct_experts(model: MoEViT, seed: int = 5) -> MoEViT:
    """Perturb experts and gates in place: upcycled experts are identical copies, so routing would not matter and
    every task's stream would stay equal to the dense model's."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".mlp." in name:
                scale = 0.5 if ".router." in name else 0.05
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model
