"""``moebsr tokens``: a picture of which image patches each token-dropping block keeps, as EViT shows it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch

from ..errors import require_extra
from ..model.token_drop import FUSED_TOKEN

# how many examples past the first ``num_images`` the picker reads, per image asked for, looking for unseen classes
SCAN_PER_IMAGE = 64


@dataclass
class TokenMap:
    """What ``moebsr tokens`` drew: per dropping block the mean fraction of patches kept on the shown images, and
    each row's example (its index in the split and its class)."""

    kept_fraction: dict[int, float]
    examples: list[int]
    classes: list[str]


def kept_masks(kept: torch.Tensor, num_patches: int) -> torch.Tensor:
    """``[B, num_patches]`` booleans from ``[B, kept]`` patch indices (the fused token, -1, is no patch)."""
    masks = torch.zeros(kept.shape[0], num_patches + 1, dtype=torch.bool, device=kept.device)
    masks.scatter_(1, torch.where(kept == FUSED_TOKEN, num_patches, kept), True)
    return masks[:, :num_patches]


def pick_examples(batches: Iterable[Mapping[str, Any]], task: str, num_images: int, num_classes: int
                  ) -> tuple[torch.Tensor, list[int], list[int]]:
    """Up to ``num_images`` examples to show, in split order: one per class first, then the next ones in order, and
    never an image equal, pixel for pixel, to one already picked.

    The first images of a split may be near copies (scikit-learn's digits has test examples 0 and 5, two 9s of one
    hand that differ by a few grey levels), and some sources hold exact duplicates (animal silhouettes): shown side by
    side they read as one image drawn twice. Returns the images, their indices in the split and their labels.
    """
    wanted_classes = min(num_images, num_classes)
    first_of_class: list[tuple[int, torch.Tensor, int]] = []
    others: list[tuple[int, torch.Tensor, int]] = []
    read = 0
    for batch in batches:
        labels = batch["labels"][task] if isinstance(batch["labels"], Mapping) else batch["labels"]
        for image, index, label in zip(batch["images"], batch["indices"].tolist(), labels.tolist()):
            read += 1
            if any(torch.equal(image, kept) for _, kept, _ in first_of_class + others):
                continue
            if label not in {kept_label for _, _, kept_label in first_of_class}:
                first_of_class.append((index, image, label))
            elif len(others) < num_images:
                others.append((index, image, label))
        if len(first_of_class) >= wanted_classes and len(first_of_class) + len(others) >= num_images:
            break
        if read >= num_images * (1 + SCAN_PER_IMAGE):
            break
    picked = sorted(first_of_class[:num_images] + others[:max(num_images - len(first_of_class), 0)],
                    key=lambda example: example[0])
    if not picked:
        raise ValueError(f"task {task!r}: no example to show")
    return (torch.stack([image for _, image, _ in picked]), [index for index, _, _ in picked],
            [label for _, _, label in picked])


def plot_kept_tokens(run_dir: str, out: str | os.PathLike, task: Optional[str] = None, num_images: int = 6,
                     split: str = "test") -> TokenMap:
    """Draw ``num_images`` images of ``task``'s ``split`` (see :func:`pick_examples` for which) and, per dropping
    block, the patches it kept (dropped patches greyed out); each row is labelled with its example's index in the
    split and its class."""
    require_extra("plots", "moebsr tokens", "matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..tasks import TaskError
    from ..training.evaluate import open_run

    accelerator, model, data = open_run(run_dir, [task] if task else None)
    network = accelerator.unwrap_model(model).eval()
    task = task or next(iter(data.tasks))
    if not network.token_drop_blocks:
        raise TaskError(f"--run: {run_dir!r} drops no tokens (token_drop.enabled is false); accepted: a run that "
                        "drops tokens")
    if num_images < 1:
        raise TaskError(f"--images: {num_images} is invalid; accepted: an integer >= 1")
    images, examples, labels = pick_examples(data.eval_loader([task], split), task, num_images,
                                             data.task_outputs()[task])
    names = data.class_names().get(task)
    classes = [names[label] if names else str(label) for label in labels]
    kept = {block: per_task[task] for block, per_task in network.kept_tokens(images, [task]).items()}
    grid_rows, grid_cols = network.backbone.patch_embed.grid_size
    patch = images.shape[-1] // grid_cols
    mean, std = data.image_spec.channel_stats()
    pictures = (images.cpu() * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)).clamp(0, 1)
    pictures = pictures.permute(0, 2, 3, 1)
    figure, axes = plt.subplots(len(pictures), 1 + len(kept), figsize=(1.6 * (1 + len(kept)), 1.6 * len(pictures)),
                                squeeze=False)
    fractions = {}
    for column, (block, indices) in enumerate([(None, None), *kept.items()]):
        masks = None if indices is None else kept_masks(indices.cpu(), grid_rows * grid_cols)
        if masks is not None:
            fractions[block] = masks.float().mean().item()
        for row, picture in enumerate(pictures):
            shown = picture
            if masks is not None:
                pixel_mask = masks[row].view(grid_rows, grid_cols).repeat_interleave(patch, 0).repeat_interleave(
                    patch, 1)[..., None]
                shown = torch.where(pixel_mask, picture, 0.15 + 0.2 * picture)
            axis = axes[row][column]
            axis.imshow((shown.squeeze(-1) if shown.shape[-1] == 1 else shown).numpy(), cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:  # which example: two rows that look alike are told apart by their index
                axis.set_ylabel(f"{split} #{examples[row]} · {classes[row]}", fontsize=7)
            if row == 0:
                # the count of kept tokens is fixed per block; how many of them are patches varies per image,
                # since the fused token (drawn nowhere) competes with the patches in later rankings
                axis.set_title("input" if block is None else f"block {block}: {indices.shape[1]} tokens kept",
                               fontsize=8)
    figure.suptitle(f"{Path(run_dir).name} · {task} · decision `{network.token_drop_decision}` · bright: kept patches",
                    fontsize=9)
    figure.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return TokenMap(fractions, examples, classes)
