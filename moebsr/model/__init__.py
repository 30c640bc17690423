"""The MoE-ViT core: per-task routed experts, task adapters, block selective reprogramming, token dropping."""

from .adapters import TaskLoRALinear, apply_task_adapters
from .block import MoEViTBlock
from .bsr import BSR_PRESETS, SUBLAYERS, BSRPlan, ResolvedBSRPlan
from .dispatch import dispatch_dense_reference, dispatch_grouped
from .errors import UnsupportedModelError
from .experts import Experts
from .factory import build_backbone, create_moevit
from .moe import MoEMlp, TaskRows
from .moevit import MoEViT
from .routing import Routing, TaskRouter, apply_capacity, load_balancing_loss
from .spec import MoESpec, TokenDropSpec, scale_block_indices
from .token_drop import (FUSED_TOKEN, TOKEN_DROP_DECISIONS, TokenSelection, attention_with_cls_scores,
                         select_tokens)

__all__ = [
    "BSR_PRESETS", "FUSED_TOKEN", "SUBLAYERS", "TOKEN_DROP_DECISIONS", "BSRPlan", "ResolvedBSRPlan", "Experts",
    "MoEMlp", "MoESpec", "MoEViT", "MoEViTBlock", "Routing", "TaskRouter", "TaskRows", "TokenDropSpec",
    "TaskLoRALinear", "TokenSelection", "UnsupportedModelError", "apply_capacity", "apply_task_adapters",
    "attention_with_cls_scores", "build_backbone", "create_moevit", "dispatch_dense_reference",
    "dispatch_grouped", "load_balancing_loss", "scale_block_indices", "select_tokens",
]
