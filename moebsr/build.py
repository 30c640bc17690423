"""From a :class:`RunConfig` to a model: depth check on a weightless build, then the real one."""

from __future__ import annotations

from typing import Mapping

import timm
import torch

from .config import ConfigError, RunConfig, validate_against_model
from .model import MoEViT, create_moevit
from .model.moevit import HeadFactory


def backbone_depth(config: RunConfig) -> int:
    """Depth of the configured backbone, from a build on the meta device (no memory, no weights, no network)."""
    if config.model.name not in timm.list_models():
        raise ConfigError(f"model.name: unknown timm model {config.model.name!r}; accepted: a timm ViT/DeiT such as "
                          "vit_tiny_patch16_224, deit_small_patch16_224")
    with torch.device("meta"):
        backbone = timm.create_model(config.model.name, pretrained=False, num_classes=0,
                                     **config.model.timm_kwargs())
    if not hasattr(backbone, "blocks"):
        raise ConfigError(f"model.name: {config.model.name!r} is not a ViT; accepted: timm vit_*/deit_* models")
    return len(backbone.blocks)


def check_config_against_model(config: RunConfig) -> None:
    validate_against_model(config, backbone_depth(config))


def model_from_config(config: RunConfig, heads: Mapping[str, HeadFactory], load_weights: bool = True) -> MoEViT:
    """Build the MoE-ViT. ``load_weights=False`` skips pretrained/local backbone weights (for loading a run)."""
    model_config = config.model
    model = create_moevit(
        model_config.name,
        heads,
        moe=config.moe.spec(),
        token_drop=config.token_drop.spec(),
        bsr=config.bsr.plan(),
        pretrained=model_config.pretrained and load_weights,
        checkpoint_path=model_config.checkpoint if load_weights else None,
        **model_config.timm_kwargs(),
    )
    if config.lora.enabled:
        from .model.lora import apply_lora
        from .model.spec import PAPER_MOE_BLOCKS, scale_block_indices
        lora = config.lora
        blocks = lora.blocks if lora.blocks is not None else scale_block_indices(PAPER_MOE_BLOCKS, model.depth)
        apply_lora(model, blocks, lora.modules, lora.rank, lora.alpha, lora.dropout)
    return model


def image_spec_of(model: MoEViT) -> dict:
    """What the model's input must look like: size, channels, normalisation."""
    patch_embed = model.backbone.patch_embed
    cfg = model.pretrained_cfg or {}
    return dict(image_size=int(patch_embed.img_size[0]), in_chans=int(patch_embed.proj.in_channels),
                mean=tuple(cfg.get("mean", (0.5, 0.5, 0.5))), std=tuple(cfg.get("std", (0.5, 0.5, 0.5))))
