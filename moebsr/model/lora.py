"""LoRA adapters on chosen blocks through PEFT, as the parameter-efficient alternative BSR is compared with.

Only ``nn.Linear`` layers can take LoRA: attention ``qkv``/``proj`` and the dense MLP's ``fc1``/``fc2``. MoE experts
are stacked tensors, not linear layers, so in MoE blocks LoRA adapts attention only.
"""

from __future__ import annotations

from typing import Sequence

from peft import LoraConfig, inject_adapter_in_model

from .adapters import check_qkv_adaptable
from .moevit import MoEViT
from .spec import ADAPTED_MODULES

LORA_MODULES = ADAPTED_MODULES


def apply_lora(model: MoEViT, blocks: Sequence[int], modules: Sequence[str] = ("qkv", "proj", "fc1", "fc2"),
               rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> list[str]:
    """Inject LoRA into ``modules`` of ``blocks``; returns the adapted layer names.

    The base weights keep the ``requires_grad`` the BSR plan gave them (PEFT would otherwise freeze everything
    but the adapters, heads included); the new adapter weights train.
    """
    unknown = [name for name in modules if name not in LORA_MODULES]
    if unknown:
        raise ValueError(f"lora.modules: unknown module(s) {unknown}; accepted: {', '.join(LORA_MODULES)}")
    if rank < 1:
        raise ValueError(f"lora.rank: {rank} is invalid; accepted: an integer >= 1")
    targets = [f"backbone.blocks.{index}.{LORA_MODULES[name]}" for index in blocks for name in modules]
    present = {name for name, _ in model.named_modules()}
    targets = [name for name in targets if name in present]  # fc1/fc2 do not exist in MoE blocks
    for name in targets:
        if name.endswith(".attn.qkv"):
            check_qkv_adaptable(model.get_submodule(name.rpartition(".")[0]), "lora.modules")
    if not targets:
        raise ValueError(f"lora: no linear layer to adapt in blocks {list(blocks)} for modules {list(modules)}")
    trainable_before = {name for name, p in model.named_parameters() if p.requires_grad}
    pattern = "^(" + "|".join(target.replace(".", r"\.") for target in targets) + ")$"
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern),
                            model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name or name.replace(".base_layer", "") in trainable_before)
    return targets
