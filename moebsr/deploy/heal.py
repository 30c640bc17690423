"""Healing a pruned task model: a short fine-tune, on the task's training split, of what the run trained.

Why: pruning sends the tokens of a removed expert to the next-best kept ones, which were never trained on them; a
few hundred steps let the kept experts, gates and head take them in. A healed model no longer computes the multitask
model's function exactly (the card says so).

What trains is what the run trained, and only that: the run's BSR plan re-applied to the task model (its trainable
blocks' sub-layers, the final norm if the plan trains it, the head), so the kept experts and gates of trainable MoE
blocks train and every frozen block stays bit-identical. Two things the run trained do not: the removed experts'
gate rows (``PrunedRouter.normalizer``, which only keeps raw probabilities' denominator), and task adapters or LoRA
of frozen blocks, merged into their layers by the export (the merged weight is a frozen layer now).

The data is the run's: the task's training split with the run's training augmentation (batch-wise shifts and flips,
or the task's ``train_transform``), shuffled with the run's seed, at the run's ``train.batch_size``; the task's own
loader, so tasks that shared image batches in the run (the ``joint`` sampler) get their own augmentation rather than
the milder one of the group.

The loss (``loss``): ``distill`` (default) matches the unpruned task model's outputs on those images (the teacher,
in eval mode): KL divergence of the softmax at temperature ``DISTILL_TEMPERATURE`` (x T^2, Hinton et al.) for a
task trained with cross-entropy, the mean squared logit difference for a task with its own ``loss_fn``. What a
deployment wants is the multitask model's behaviour at a smaller size, and the teacher's full output says more per
image than its label: on the quickstart's two validation runs, pruned to half the experts, it kept every task within
0.5 point at both heal LRs swept (worst -0.50), where the label loss lost up to 1.00 (bench/deploy.py's heal sweep).
``task``: the task's own loss on the labels (``Task.loss``). Neither adds the balancing loss: it would push mass back
onto every kept expert, which is not what the deployed task needs. AdamW (timm's, so norms, biases and tokens get no
weight decay, as in training) at a cosine schedule from ``lr`` to 0, gradients clipped at the run's
``train.grad_clip``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import BSRConfig, RunConfig, TrainConfig
from ..model import MoEViT
from ..model.bsr import ResolvedBSRPlan
from ..tasks import Task

# From bench/deploy.py's heal sweep on the quickstart's validation runs (never the test split): the heal LR as a
# share of the run's train.lr
DEFAULT_LR_SCALE = 0.1
HEAL_LOSSES = ("distill", "task")
DEFAULT_HEAL_LOSS = "distill"  # see the module doc
DISTILL_TEMPERATURE = 2.0


@dataclass
class HealReport:
    """What a heal did; ``to_dict`` is the ``heal`` entry of the export section.

    Attributes:
        steps / lr / batch_size / weight_decay / grad_clip / seed: the fine-tune's settings.
        split / augmentation: the data it saw.
        loss: ``distill`` (towards the unpruned task model) or ``task`` (the labels); see the module doc.
        trainable_parameters: parameters it changed (the rest stayed bit-identical).
        loss_first / loss_last: the task loss, mean of the first and of the last ``min(10, steps)`` steps.
    """

    steps: int
    lr: float
    batch_size: int
    weight_decay: float
    grad_clip: float
    seed: int
    split: str
    augmentation: str
    trainable_parameters: int
    loss_first: float
    loss_last: float
    loss: str
    schedule: str = "cosine to 0, no warm-up"
    optimizer: str = "adamw"

    def to_dict(self) -> dict:
        return asdict(self)


def default_heal_lr(train_config: TrainConfig) -> float:
    """The heal LR when none is given: ``DEFAULT_LR_SCALE`` of the run's peak LR (``train_config.lr``)."""
    return DEFAULT_LR_SCALE * train_config.lr


def unfreeze_for_heal(model: MoEViT, plan: ResolvedBSRPlan) -> list[nn.Parameter]:
    """Make trainable what the run's plan trains (see the module doc), everything else frozen; returns those."""
    model.apply_bsr(plan)
    for layer in model.moe_layers().values():
        normalizer = getattr(layer.router, "normalizer", None)
        if normalizer is not None:
            normalizer.requires_grad_(False)
    return list(model.trainable_parameters())


def distill_loss(task: Task, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The ``distill`` loss of the module doc, between the student's and the teacher's logits."""
    if task.loss_fn is not None:
        return F.mse_loss(student.float(), teacher.float())
    temperature = DISTILL_TEMPERATURE
    return F.kl_div((student.float() / temperature).log_softmax(-1), (teacher.float() / temperature).log_softmax(-1),
                    reduction="batchmean", log_target=True) * temperature ** 2


def heal(model: MoEViT, task: Task, batches: Iterator[dict], plan: ResolvedBSRPlan, steps: int, lr: float, *,
         weight_decay: float = 0.0, grad_clip: float = 0.0, seed: int = 0, teacher: Optional[MoEViT] = None
         ) -> list[float]:
    """Fine-tune ``model`` in place for ``steps`` batches ``{"images", "labels"}`` (on the model's device) of
    ``task``; returns the loss of every step. Frozen and in eval mode again afterwards.

    With ``teacher`` (the unpruned task model) the loss is :func:`distill_loss` towards its outputs, else the task's
    own loss on the labels. Seeded (``seed``) inside a forked RNG, so the caller's random state is untouched; the
    losses stay on the device until the last step (one host sync per heal, not per step).
    """
    from timm.optim import create_optimizer_v2

    from ..training.optim import warmup_cosine

    if steps < 1:
        raise ValueError(f"--heal-steps: {steps} is invalid; accepted: an integer >= 1")
    if not lr > 0:
        raise ValueError(f"--heal-lr: {lr!r} is invalid; accepted: a number > 0")
    if teacher is not None:
        teacher.requires_grad_(False)
        teacher.eval()
    trainable = unfreeze_for_heal(model, plan)
    if not trainable:
        raise ValueError("heal: the run's BSR plan trains nothing of this model")
    device = trainable[0].device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, 0, steps, 0.0))
        model.train()
        losses = []
        for _ in range(steps):
            batch = next(batches)
            images, labels = batch["images"].to(device), batch["labels"].to(device)
            logits = model(images, task.name)[task.name]
            if teacher is None:
                loss = task.loss(logits, labels)
            else:
                with torch.no_grad():
                    target = teacher(images, task.name)[task.name]
                loss = distill_loss(task, logits, target)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
    model.requires_grad_(False)
    model.eval()
    return torch.stack(losses).float().cpu().tolist()


def heal_task_model(model: MoEViT, config: RunConfig, task: str, steps: int, lr: Optional[float] = None,
                    teacher: Optional[MoEViT] = None, seed: Optional[int] = None) -> HealReport:
    """Heal ``model`` (a task model of the run ``config`` describes) as the module doc says; returns the report.

    With ``teacher`` (the task model before pruning; it is not changed) the loss is ``distill``, without it ``task``.
    ``seed`` (default: the run's ``train.seed``) seeds the data order and the fine-tune, so a heal's spread over seeds
    can be measured.
    """
    from ..data import build_task_loader
    from ..data.image_datasets import TensorImageDataset
    from ..training.build import image_spec_of
    from ..training.run_data import RunData

    lr = default_heal_lr(config.train) if lr is None else lr
    train = config.train
    seed = train.seed if seed is None else seed
    data = RunData.from_config(config, check_data=False)
    definition = data.tasks[task]
    device = next(model.parameters()).device
    loader = build_task_loader(definition, "train", image_spec_of(model), train.batch_size, train=True,
                               seed=seed, device=device)

    def cycle() -> Iterator[dict]:
        while True:
            yield loader.next_batch()

    try:
        losses = heal(model, definition, cycle(), config.bsr.plan().resolve(model.depth), steps, lr,
                      weight_decay=train.weight_decay, grad_clip=train.grad_clip, seed=seed, teacher=teacher)
    finally:
        loader.close()
    window = min(10, steps)
    augment = definition.batch_augment
    if isinstance(loader.dataset, TensorImageDataset):
        augmentation = (f"the run's: shifts of up to {augment.crop_padding} px"
                        f"{', horizontal flips' if augment.hflip else ''}" if augment.crop_padding or augment.hflip
                        else "none (the task has none)")
    else:
        augmentation = "the run's: the task's train_transform" if definition.train_transform is not None else \
            "the run's: timm's training transform"
    return HealReport(steps=steps, lr=lr, batch_size=loader.batch_size, weight_decay=train.weight_decay,
                      grad_clip=train.grad_clip, seed=seed, split="train", augmentation=augmentation,
                      trainable_parameters=trainable_count(model, config.bsr),
                      loss_first=sum(losses[:window]) / window, loss_last=sum(losses[-window:]) / window,
                      loss="task" if teacher is None else "distill")


def trainable_count(model: MoEViT, bsr: BSRConfig) -> int:
    """Parameters a heal trains in ``model`` (those ``bsr``'s plan trains), counted without leaving them trainable."""
    count = sum(p.numel() for p in unfreeze_for_heal(model, bsr.plan().resolve(model.depth)))
    model.requires_grad_(False)
    return count

