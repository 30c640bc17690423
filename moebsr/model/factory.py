"""``create_moevit``: turn a timm ViT/DeiT or EVA/EVA-02 (by name or instance) into a multitask MoE-ViT."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import timm
import torch
import torch.nn as nn
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from ..errors import first_line
from .block import MoEViTBlock
from .bsr import BSRPlan, as_bsr_plan
from .errors import UnsupportedModelError
from .eva import EvaMoEViTBlock, check_eva, is_eva
from .gated_experts import is_gated_mlp, upcycle_experts
from .moe import MoEMlp
from .moevit import HeadFactory, MoEViT
from .routing import TaskRouter
from .spec import MoESpec, TokenDropSpec


def _as_spec(value: Any, spec_type: type, key: str) -> Any:
    if value is None or isinstance(value, spec_type):
        return value
    if isinstance(value, Mapping):
        known = set(spec_type.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{key}: unknown key(s) {unknown}; accepted: {', '.join(sorted(known))}")
        return spec_type(**value)
    raise ValueError(f"{key}: expected a {spec_type.__name__} or a mapping, got {type(value).__name__}")


VIT_MODULES = ("vision_transformer", "deit", "eva")  # timm modules whose models build a VisionTransformer or an Eva
BACKBONE_TYPES = (VisionTransformer, Eva)
ACCEPTED_NAMES = ("accepted: a timm ViT/DeiT (models that build a timm VisionTransformer, e.g. vit_tiny_patch16_224, "
                  "deit_small_patch16_224; see timm.list_models(module='vision_transformer')) or EVA/EVA-02 (models "
                  "that build a timm Eva, e.g. eva02_tiny_patch14_224; module='eva'); not BEiT, SAM, parallel-block "
                  "ViTs, Swin or CNNs")
ACCEPTED_FAMILIES = ("accepted: timm VisionTransformer models (vit_*, deit_*, deit3_*, DINOv2, CLIP, SigLIP, ...) or "
                     "Eva models (EVA/EVA-02: eva02_*, eva_giant_*); not BEiT, SAM, parallel-block ViTs, Swin or CNNs")


def check_model_name(name: str) -> str:
    """A timm ViT/DeiT or EVA name, or a one-line error naming the accepted families (before any kwargs reach timm,
    where a CNN would fail on ``img_size`` with a TypeError)."""
    if name not in timm.list_models():
        raise UnsupportedModelError(f"model.name: unknown timm model {name!r}; {ACCEPTED_NAMES}")
    if not timm.models.is_model_in_modules(name, VIT_MODULES) and not _builds_a_vision_transformer(name):
        raise UnsupportedModelError(f"model.name: {name!r} is not a ViT (it is a timm "
                                    f"{_model_module(name)!r} model); {ACCEPTED_NAMES}")
    return name


def _builds_a_vision_transformer(name: str) -> bool:
    """Whether the model is a timm VisionTransformer or Eva whatever module defines it (the hybrid ViTs such as
    vit_base_r50_s16_224 are): built on the meta device, with no memory, weights or network."""
    try:
        with torch.device("meta"):
            return isinstance(timm.create_model(name, pretrained=False, num_classes=0), BACKBONE_TYPES)
    except Exception:  # a model that cannot even be built this way is not one we can convert
        return False


def _model_module(name: str) -> str:
    from timm.models._registry import _model_to_module
    return _model_to_module.get(name, "?")


def build_backbone(
        model: Union[str, nn.Module],
        pretrained: bool = False,
        checkpoint_path: Optional[str] = None,
        **timm_kwargs: Any,
) -> Union[VisionTransformer, Eva]:
    """A headless timm ViT or Eva. ``checkpoint_path`` loads local weights through timm's pretrained machinery
    (head dropped, position embeddings resampled to ``img_size``), which also works offline."""
    if isinstance(model, nn.Module):
        backbone = model
    else:
        check_model_name(model)
        kwargs = dict(timm_kwargs)
        if checkpoint_path is not None:
            if not os.path.isfile(checkpoint_path):
                raise FileNotFoundError(f"model.checkpoint: no file at {checkpoint_path!r}")
            pretrained = True
            kwargs["pretrained_cfg_overlay"] = dict(file=os.fspath(checkpoint_path))
        try:
            backbone = timm.create_model(model, pretrained=pretrained, num_classes=0, **kwargs)
        except Exception as error:  # safetensors, pickle and shape errors alike: name the file
            if checkpoint_path is None:
                raise
            raise ValueError(f"model.checkpoint: cannot load {checkpoint_path!r} into {model}: {first_line(error)}") \
                from error
    if not isinstance(backbone, BACKBONE_TYPES):
        raise UnsupportedModelError(f"model: {type(backbone).__name__} is not supported; {ACCEPTED_FAMILIES}")
    if is_eva(backbone):
        check_eva(backbone)
    backbone.reset_classifier(0)
    return backbone


def _build_head(task: str, head: HeadFactory, num_features: int) -> nn.Module:
    if isinstance(head, bool) or head is None:
        raise ValueError(f"tasks.{task}: head {head!r} is invalid; accepted: an output count, a module, a factory")
    if isinstance(head, int):
        if head < 1:
            raise ValueError(f"tasks.{task}: {head} outputs is invalid; accepted: an integer >= 1")
        return nn.Linear(num_features, head)
    if isinstance(head, nn.Module):
        return head
    return head(num_features)


def _check_backend(moe_spec: MoESpec, backbone: nn.Module) -> None:
    if moe_spec.backend == "tutel" and (moe_spec.blocks is None or len(moe_spec.blocks)) and any(
            is_gated_mlp(getattr(block, "mlp", None)) for block in backbone.blocks):
        raise UnsupportedModelError("moe.backend: tutel cannot run GatedExperts (experts upcycled from a gated MLP, "
                                    "EVA-02's SwiGLU); accepted: moe.backend=torch for them")


def upcycled_moe_layer(mlp: nn.Module, moe_spec: MoESpec, index: int, embed_dim: int, task_names: list[str]
                       ) -> nn.Module:
    """Block ``index``'s MoE layer: experts copied from its dense ``mlp``, a router (per task or shared, as the spec
    says for this block) and the configured backend's layer around them."""
    experts = upcycle_experts(mlp, moe_spec.num_experts, moe_spec.hidden_features, moe_spec.expert_rank)
    router = TaskRouter(embed_dim, moe_spec.num_experts, moe_spec.top_k, task_names,
                        mode=moe_spec.router_mode(index), renormalize=moe_spec.renormalize)
    if moe_spec.backend == "tutel":
        from .tutel_backend import TutelMoEMlp
        layer = TutelMoEMlp(router.to(experts.fc1_weight.device), experts, moe_spec.capacity_factor)
    else:
        layer = MoEMlp(router.to(experts.fc1_weight.device), experts, moe_spec.capacity_factor,
                       dispatch=moe_spec.dispatch)
    layer.recompute_experts = moe_spec.recompute_experts
    return layer


def create_moevit(
        model: Union[str, nn.Module],
        tasks: Mapping[str, HeadFactory],
        moe: Union[MoESpec, Mapping[str, Any], None] = None,
        token_drop: Union[TokenDropSpec, Mapping[str, Any], None] = None,
        bsr: Union[BSRPlan, str, Mapping[str, Any], None] = "paper",
        pretrained: bool = False,
        checkpoint_path: Optional[str] = None,
        **timm_kwargs: Any,
) -> MoEViT:
    """Build a multitask MoE-ViT.

    Args:
        model: A timm model name (``vit_*``/``deit_*``/``eva02_*``) or a ``VisionTransformer``/``Eva`` instance.
        tasks: Task name -> output count (a linear head), a head module, or a factory ``num_features -> head``.
        moe: Where and how MLPs become MoE; ``None`` = :class:`MoESpec` defaults (the paper's 3/7/11 scaled to
            depth, 16 experts, top-4). ``MoESpec(blocks=())`` keeps the model dense.
        token_drop: Token dropping; ``None`` = no dropping.
        bsr: Trainable-part plan or preset name; default ``paper``.
        pretrained: timm pretrained weights (needs a network).
        checkpoint_path: Local weights for the backbone (safetensors or torch file), loaded via timm.
        **timm_kwargs: Passed to ``timm.create_model`` (e.g. ``img_size``, ``patch_size``, ``depth``).

    Raises:
        ValueError: naming the key, the bad value and the accepted ones, before any weight is touched.
    """
    if not tasks:
        raise ValueError("tasks: no task given; accepted: a mapping of task name -> outputs or head")
    moe_spec = _as_spec(moe, MoESpec, "moe") or MoESpec()
    drop_spec = _as_spec(token_drop, TokenDropSpec, "token_drop")
    plan = as_bsr_plan(bsr)

    backbone = build_backbone(model, pretrained=pretrained, checkpoint_path=checkpoint_path, **timm_kwargs)
    depth = len(backbone.blocks)
    _check_backend(moe_spec, backbone)
    moe_spec.validate(depth)
    if drop_spec is not None:
        drop_spec.validate(depth)
    resolved_plan = plan.resolve(depth)

    moe_blocks = set(moe_spec.resolve_blocks(depth))
    drop_blocks = set(drop_spec.resolve_blocks(depth)) if drop_spec is not None else set()
    task_names = list(tasks)
    block_type = EvaMoEViTBlock if is_eva(backbone) else MoEViTBlock
    blocks = []
    for index, block in enumerate(backbone.blocks):
        keep_rate = drop_spec.keep_rate if index in drop_blocks else None
        fuse = drop_spec.fuse if drop_spec is not None else True
        # built before the MLP is read, so an unsupported block (a parallel-block ViT's) is refused in one line
        moe_block = block_type(block, None, keep_rate, fuse, backbone.num_prefix_tokens,
                               class_token=getattr(backbone, "cls_token", None) is not None)
        if index in moe_blocks:
            moe_block.mlp = upcycled_moe_layer(moe_block.mlp, moe_spec, index, backbone.embed_dim, task_names)
        blocks.append(moe_block)
    backbone.blocks = nn.Sequential(*blocks)

    heads = {name: _build_head(name, head, backbone.num_features) for name, head in tasks.items()}
    moevit = MoEViT(backbone, heads, token_drop_decision=drop_spec.decision if drop_spec is not None else "shared")
    moevit.apply_bsr(resolved_plan)
    return moevit
