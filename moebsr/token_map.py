"""``moebsr tokens``: a picture of which image patches each token-dropping block keeps, as EViT shows it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from .model.token_drop import FUSED_TOKEN


def kept_masks(kept: torch.Tensor, num_patches: int) -> torch.Tensor:
    """``[B, num_patches]`` booleans from ``[B, kept]`` patch indices (the fused token, -1, is no patch)."""
    masks = torch.zeros(kept.shape[0], num_patches + 1, dtype=torch.bool, device=kept.device)
    masks.scatter_(1, torch.where(kept == FUSED_TOKEN, num_patches, kept), True)
    return masks[:, :num_patches]


def plot_kept_tokens(run_dir: str, out: str | os.PathLike, task: Optional[str] = None, num_images: int = 6,
                     split: str = "test") -> dict[int, float]:
    """Draw ``num_images`` images of ``task``'s ``split`` and, per dropping block, the patches it kept (dropped
    patches greyed out). Returns the mean fraction of patches each block keeps on them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluate import open_run
    from .tasks import TaskError

    accelerator, model, data = open_run(run_dir, [task] if task else None)
    network = accelerator.unwrap_model(model).eval()
    task = task or next(iter(data.tasks))
    if not network.token_drop_blocks:
        raise TaskError(f"--run: {run_dir!r} drops no tokens (token_drop.enabled is false); accepted: a run that "
                        "drops tokens")
    if num_images < 1:
        raise TaskError(f"--images: {num_images} is invalid; accepted: an integer >= 1")
    images = next(iter(data.eval_loader([task], split)))["images"][:num_images]
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
            axis.imshow(shown.squeeze(-1) if shown.shape[-1] == 1 else shown, cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
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
    return fractions
