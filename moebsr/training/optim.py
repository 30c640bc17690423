"""Optimizer and learning-rate schedule for the trainable parameters only."""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.optim import create_optimizer_v2

from ..config import TrainConfig
from ..model import MoEViT


def build_optimizer(model: MoEViT, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD through timm, which skips frozen parameters, exempts what ``model.no_weight_decay()`` names
    (norms, biases, tokens) from weight decay and, with ``layer_decay``, gives each group an ``lr_scale`` from the
    model's ``group_matcher`` (applied by :func:`build_scheduler`)."""
    kwargs = dict(momentum=train.momentum) if train.optimizer == "sgd" else {}
    return create_optimizer_v2(model, opt=train.optimizer, lr=train.lr, weight_decay=train.weight_decay,
                               layer_decay=train.layer_decay, **kwargs)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0 to 1, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _scaled_warmup_cosine(step: int, lr_scale: float, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    return lr_scale * warmup_cosine(step, warmup_steps, total_steps, min_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine for every group, times the group's ``lr_scale`` (layer decay).

    timm's own schedulers read ``lr_scale``; torch's ``LambdaLR`` does not, so it is folded into each group's
    multiplier here (without it ``train.layer_decay`` silently did nothing).
    """
    min_ratio = train.min_lr / train.lr
    multipliers = [partial(_scaled_warmup_cosine, lr_scale=group.get("lr_scale", 1.0), warmup_steps=train.warmup_steps,
                           total_steps=train.steps, min_ratio=min_ratio) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multipliers)
