"""From a :class:`RunConfig` to a model: depth check on a weightless build, then the real one."""

from __future__ import annotations

from typing import Any, Mapping

import timm
import torch

from ..config import ConfigError, ModelConfig, RunConfig, validate_against_model
from ..model import MoEViT, create_moevit
from ..model.factory import check_model_name
from ..model.frozen_storage import store_frozen_weights
from ..model.moevit import HeadFactory
from ..model.prune import prune_experts
from .checkpoint import CheckpointError


def backbone_depth(model_config: ModelConfig) -> int:
    """Depth of the backbone ``model_config`` configures, from a build on the meta device (no memory, no weights,
    no network)."""
    try:
        check_model_name(model_config.name)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    check_timm_kwargs(model_config.timm_kwargs, model_config.name)
    kwargs = model_config.create_kwargs()
    try:
        with torch.device("meta"):
            backbone = timm.create_model(model_config.name, pretrained=False, num_classes=0, **kwargs)
    except (TypeError, ValueError, AssertionError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"model: {model_config.name} cannot be built with {kwargs}: {first_line}") from None
    if not hasattr(backbone, "blocks"):
        raise ConfigError(f"model.name: {model_config.name!r} is not a ViT; accepted: timm vit_*/deit_*/eva02_* models")
    return len(backbone.blocks)


def check_timm_kwargs(timm_kwargs: Mapping[str, object], model_name: str = "") -> None:
    """``model.timm_kwargs`` may only name arguments of the timm class the model builds (``Eva`` for an EVA model,
    else ``VisionTransformer``): one line for any other, before timm sees it."""
    import inspect

    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer
    is_eva = bool(model_name) and timm.models.is_model_in_modules(model_name, ["eva"])
    model_class = Eva if is_eva else VisionTransformer
    accepted = [name for name in inspect.signature(model_class.__init__).parameters
                if name not in ("self", "num_classes", "kwargs", "device", "dtype", *ModelConfig.ARCHITECTURE_FIELDS)]
    for key in timm_kwargs:
        if key not in accepted:
            raise ConfigError(f"model.timm_kwargs: unknown key {key!r}; accepted: {', '.join(accepted)}")


def check_config_against_model(config: RunConfig) -> None:
    validate_against_model(config, backbone_depth(config.model))


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
        **model_config.create_kwargs(),
    )
    if config.lora.enabled:
        from ..model.lora import apply_lora
        from ..model.spec import PAPER_MOE_BLOCKS, scale_block_indices
        lora = config.lora
        blocks = lora.blocks if lora.blocks is not None else scale_block_indices(PAPER_MOE_BLOCKS, model.depth)
        apply_lora(model, blocks, lora.modules, lora.rank, lora.alpha, lora.dropout)
    if config.adapters.enabled:
        from ..model.adapters import apply_task_adapters
        adapters = config.adapters
        apply_task_adapters(model, list(heads), config.adapters_blocks(model.depth), adapters.modules, adapters.rank,
                            adapters.alpha)
    if config.moe.collapse_frozen:
        from ..model.frozen_experts import collapse_frozen_experts
        collapse_frozen_experts(model)
    store_frozen_weights(model, config.bsr.frozen_dtype)  # after everything that decides what trains
    return model


def model_for_run(config: RunConfig, heads: Mapping[str, HeadFactory], document: Mapping) -> MoEViT:
    """The model a saved folder holds, built without weights: a training run's, or a task model written by
    ``moebsr export`` (its ``export`` section says which experts each MoE layer kept)."""
    model = model_from_config(config, heads, load_weights=False)
    if "export" in document:
        apply_export_structure(model, document["export"])
    return model


def apply_export_structure(model: MoEViT, export: Mapping[str, Any]) -> MoEViT:
    """Give a model freshly built from a task folder's config the structure its weights have (before loading)."""
    try:
        kept = {int(block): [int(e) for e in experts] for block, experts in export["kept_experts"].items()}
        prune_experts(model, kept)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"config.json: its export section does not describe this model ({error})") from None
    split = export.get("split_point")
    model.origin_split_point = None if split is None else (int(split[0]), str(split[1]))
    return model


def image_spec_of(model: MoEViT) -> dict:
    """What the model's input must look like: size, channels, normalisation."""
    patch_embed = model.backbone.patch_embed
    cfg = model.pretrained_cfg or {}
    return dict(image_size=int(patch_embed.img_size[0]), in_chans=int(patch_embed.proj.in_channels),
                mean=tuple(cfg.get("mean", (0.5, 0.5, 0.5))), std=tuple(cfg.get("std", (0.5, 0.5, 0.5))))
