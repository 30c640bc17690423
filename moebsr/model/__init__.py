"""The MoE-ViT core: per-task routed experts, task adapters, block selective reprogramming, token dropping.

The names below are imported on first use (PEP 562), not with the package: ``moebsr.config`` reads the torch-free
``spec`` and ``bsr`` modules of this package, and a config refused for a bad key must not wait for torch and timm.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module of this package that defines it
_EXPORTS = {
    "TaskLoRALinear": "adapters", "apply_task_adapters": "adapters",
    "MoEViTBlock": "block",
    "BSR_PRESETS": "bsr", "SUBLAYERS": "bsr", "BSRPlan": "bsr", "ResolvedBSRPlan": "bsr",
    "dispatch_dense_reference": "dispatch", "dispatch_grouped": "dispatch",
    "UnsupportedModelError": "errors",
    "Experts": "experts",
    "build_backbone": "factory", "create_moevit": "factory",
    "MoEMlp": "moe", "TaskRows": "moe",
    "MoEViT": "moevit",
    "Routing": "routing", "TaskRouter": "routing", "apply_capacity": "routing", "load_balancing_loss": "routing",
    "MoESpec": "spec", "TokenDropSpec": "spec", "scale_block_indices": "spec",
    "FUSED_TOKEN": "token_drop", "TOKEN_DROP_DECISIONS": "spec", "TokenSelection": "token_drop",
    "attention_with_cls_scores": "token_drop", "select_tokens": "token_drop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
