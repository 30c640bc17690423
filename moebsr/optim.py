"""Optimizer and learning-rate schedule for the trainable parameters only."""

from __future__ import annotations

import math

import torch
from timm.optim import create_optimizer_v2

from .config import TrainConfig
from .model import MoEViT


def build_optimizer(model: MoEViT, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD through timm, which skips frozen parameters, exempts norms/biases/tokens from weight
    decay (``no_weight_decay``) and applies layer-wise decay from the model's ``group_matcher``."""
    kwargs = dict(momentum=train.momentum) if train.optimizer == "sgd" else {}
    return create_optimizer_v2(model, opt=train.optimizer, lr=train.lr, weight_decay=train.weight_decay,
                               layer_decay=train.layer_decay, **kwargs)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0 to 1, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    min_ratio = train.min_lr / train.lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, train.warmup_steps, train.steps, min_ratio))
