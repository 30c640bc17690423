"""Experts as low-rank deltas of the dense MLP they were upcycled from (``moe.expert_rank``, MoLoRA-style).

Upcycled experts start as ``num_experts`` exact copies of one dense MLP, and nearly all of an MoE block's trainable
memory is those copies: their weights, gradients and optimizer state. Here the copy is stored once, frozen, and
expert ``e`` is ``fc2(act(fc1(x)))`` with ``fc1 = W1 + B1_e A1_e`` and ``fc2 = W2 + B2_e A2_e`` (rank ``r``, ``B``
starting at zero, so step 0 still equals the dense MLP), plus its own biases. Training an MoE block's ``mlp``
then trains ``num_experts * (2 r (dim + hidden) + dim + hidden)`` numbers instead of ``num_experts`` whole MLPs.
The delta is applied as two thin matmuls beside the shared one (``x A^T B^T``), never as a materialised weight,
so backward keeps ``x A^T`` (``r`` numbers a token) and not a ``hidden x dim`` matrix per expert.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from .errors import UnsupportedModelError
from .experts import Experts
from .precision import frozen_linear

# (weight, bias, A, B) of fc1 then fc2, each expert's own except the shared weight
LowRankWeights = tuple[torch.Tensor, ...]


class LowRankExperts(Experts):
    """``num_experts`` MLPs sharing one frozen ``fc1_weight`` [hidden, dim] / ``fc2_weight`` [dim, hidden], each with
    its own biases and rank-``rank`` deltas ``fc*_lora_b @ fc*_lora_a``."""

    FROZEN_PARAMETERS = ("fc1_weight", "fc2_weight")  # the shared copy: marking the bank trainable leaves it frozen

    def __init__(self, num_experts: int, dim: int, hidden_features: int, act_layer: nn.Module, rank: int,
                 drop: float = 0.0) -> None:
        nn.Module.__init__(self)  # not Experts.__init__: no stacked [E, hidden, dim] weights to allocate
        self.num_experts, self.dim, self.hidden_features, self.rank = num_experts, dim, hidden_features, rank
        self.fc1_weight = nn.Parameter(torch.empty(hidden_features, dim), requires_grad=False)
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, hidden_features))
        self.fc2_weight = nn.Parameter(torch.empty(dim, hidden_features), requires_grad=False)
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.fc1_lora_a = nn.Parameter(torch.empty(num_experts, rank, dim))
        self.fc1_lora_b = nn.Parameter(torch.zeros(num_experts, hidden_features, rank))
        self.fc2_lora_a = nn.Parameter(torch.empty(num_experts, rank, hidden_features))
        self.fc2_lora_b = nn.Parameter(torch.zeros(num_experts, dim, rank))
        self.act = act_layer
        self.drop = nn.Dropout(drop)
        nn.init.trunc_normal_(self.fc1_weight, std=0.02)
        nn.init.trunc_normal_(self.fc2_weight, std=0.02)
        for a in (self.fc1_lora_a, self.fc2_lora_a):  # PEFT's LoRA init: A Kaiming-uniform per expert, B zero
            for expert in a:
                nn.init.kaiming_uniform_(expert, a=math.sqrt(5))

    def requires_grad_(self, requires_grad: bool = True) -> "LowRankExperts":
        """BSR marks the bank; the shared copy never trains (training it would be a dense MLP's memory again)."""
        super().requires_grad_(requires_grad)
        for name in self.FROZEN_PARAMETERS:
            getattr(self, name).requires_grad_(False)
        return self

    def split(self) -> list[LowRankWeights]:
        """Each expert's ``(fc1_bias, fc1_lora_a, fc1_lora_b, fc2_bias, fc2_lora_a, fc2_lora_b)`` views (see
        :meth:`Experts.split` for why they are unbound once)."""
        names = ("fc1_bias", "fc1_lora_a", "fc1_lora_b", "fc2_bias", "fc2_lora_a", "fc2_lora_b")
        return list(zip(*(getattr(self, name).unbind(0) for name in names)))

    def forward_expert(self, expert: int, tokens: torch.Tensor, split: Optional[list] = None) -> torch.Tensor:
        fc1_bias, fc1_a, fc1_b, fc2_bias, fc2_a, fc2_b = (split or self.split())[expert]
        hidden = self.drop(self.act(self._layer(tokens, self.fc1_weight, fc1_bias, fc1_a, fc1_b)))
        return self.drop(self._layer(hidden, self.fc2_weight, fc2_bias, fc2_a, fc2_b))

    @staticmethod
    def _layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor
               ) -> torch.Tensor:
        # the shared weight may be stored in bf16 (bsr.frozen_dtype): frozen_linear casts it per matmul (and gives a
        # bias no gradient, so the trainable bias is added here)
        return frozen_linear(x, weight) + F.linear(F.linear(x, a), b, bias)

    def forward_batched(self, slots: torch.Tensor) -> torch.Tensor:
        """``[E, slots, dim] -> [E, slots, dim]``: the shared matmul on every slot at once, the deltas batched."""
        hidden = self._batched_layer(slots, self.fc1_weight, self.fc1_bias, self.fc1_lora_a, self.fc1_lora_b)
        hidden = self.drop(self.act(hidden))
        return self.drop(self._batched_layer(hidden, self.fc2_weight, self.fc2_bias, self.fc2_lora_a,
                                             self.fc2_lora_b))

    @staticmethod
    def _batched_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, a: torch.Tensor,
                       b: torch.Tensor) -> torch.Tensor:
        shared = frozen_linear(x, weight, None) + bias.unsqueeze(1).to(x.dtype)
        return shared + torch.bmm(torch.bmm(x, a.to(x.dtype).transpose(1, 2)), b.to(x.dtype).transpose(1, 2))

    def expert_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``expert``'s whole ``fc1``/``fc2`` weights, ``W + B A``, merged in fp32 (a shared weight stored in
        bf16 would round the delta away; :meth:`Experts.dense_mlp` builds its ``Mlp`` in fp32 from them)."""
        fc1 = self.fc1_weight.float() + self.fc1_lora_b[expert].float() @ self.fc1_lora_a[expert].float()
        fc2 = self.fc2_weight.float() + self.fc2_lora_b[expert].float() @ self.fc2_lora_a[expert].float()
        return fc1, fc2

    def are_copies(self) -> bool:
        """Every expert computes what expert 0 does: equal biases and equal deltas ``B A`` (true as upcycled)."""
        deltas = [torch.bmm(b, a) for a, b in ((self.fc1_lora_a, self.fc1_lora_b), (self.fc2_lora_a, self.fc2_lora_b))]
        return all(torch.equal(p, p[:1].expand_as(p)) for p in (self.fc1_bias, self.fc2_bias, *deltas))

    def select_experts(self, index: torch.Tensor) -> "LowRankExperts":
        """A bank of only the experts in ``index`` (expert pruning), sharing a copy of the frozen weights."""
        kept = LowRankExperts(len(index), self.dim, self.hidden_features, copy.deepcopy(self.act), self.rank,
                              drop=self.drop.p)
        for name, parameter in self.named_parameters(recurse=False):
            data = parameter.detach()
            getattr(kept, name).data = data.clone() if name in self.FROZEN_PARAMETERS else data.index_select(0, index)
        return kept

    @classmethod
    def upcycle(cls, mlp: nn.Module, num_experts: int, hidden_features: Optional[int] = None,
                rank: int = 8) -> "LowRankExperts":
        """Experts that each start as ``mlp`` (a timm ``Mlp``): its weights shared and frozen, its biases copied."""
        if not isinstance(mlp, Mlp) or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.norm, nn.Identity):
            raise UnsupportedModelError(
                f"moe.expert_rank: cannot make low-rank experts of a {type(mlp).__name__}; accepted: timm.layers.Mlp "
                "with linear fc1/fc2 and no inner norm (ViT/DeiT/EVA MLPs), or moe.expert_rank=null")
        dense_hidden, dim = mlp.fc1.weight.shape
        if hidden_features not in (None, dense_hidden):
            raise UnsupportedModelError(
                f"moe.expert_rank: low-rank experts are deltas of the dense MLP (hidden {dense_hidden}), so "
                f"moe.hidden_features={hidden_features} cannot be; accepted: moe.hidden_features=null")
        experts = cls(num_experts, dim, dense_hidden, copy.deepcopy(mlp.act), rank, drop=mlp.drop1.p)
        experts = experts.to(device=mlp.fc1.weight.device, dtype=mlp.fc1.weight.dtype)
        with torch.no_grad():
            experts.fc1_weight.copy_(mlp.fc1.weight)
            experts.fc2_weight.copy_(mlp.fc2.weight)
            if mlp.fc1.bias is not None:
                experts.fc1_bias.copy_(mlp.fc1.bias.expand(num_experts, -1))
            if mlp.fc2.bias is not None:
                experts.fc2_bias.copy_(mlp.fc2.bias.expand(num_experts, -1))
        return experts
