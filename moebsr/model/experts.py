"""A bank of expert MLPs stored as stacked tensors, upcycled from a pretrained dense MLP.

Stacked weights (``[E, hidden, dim]`` / ``[E, dim, hidden]``) rather than a ModuleList of ``Mlp``s: one
parameter per role keeps optimizer groups and state dicts small, lets an expert be applied with a plain
``F.linear`` on its slice, and has the same layout tutel's batched FFN experts use.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import Mlp

from .errors import UnsupportedModelError
from .precision import frozen_batched_linear, frozen_linear

ExpertWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class Experts(nn.Module):
    """``num_experts`` two-layer MLPs ``fc2(act(fc1(x)))`` with shared activation and dropout."""

    def __init__(
            self,
            num_experts: int,
            dim: int,
            hidden_features: int,
            act_layer: nn.Module,
            drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.dim = dim
        self.hidden_features = hidden_features
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, hidden_features, dim))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, hidden_features))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, dim, hidden_features))
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.act = act_layer
        self.drop = nn.Dropout(drop)
        nn.init.trunc_normal_(self.fc1_weight, std=0.02)
        nn.init.trunc_normal_(self.fc2_weight, std=0.02)

    def split(self) -> list[ExpertWeights]:
        """Each expert's ``(fc1_weight, fc1_bias, fc2_weight, fc2_bias)`` as views, split once per forward.

        Indexing a stacked parameter per expert would make autograd allocate and add a full-size zero gradient
        for every index (``SelectBackward``: 16 experts cost 16 stacks of zeros per parameter); ``unbind`` writes
        all the experts' gradients into one.
        """
        return list(zip(*(p.unbind(0) for p in (self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias))))

    def forward_expert(self, expert: int, tokens: torch.Tensor,
                       split: Optional[list[ExpertWeights]] = None) -> torch.Tensor:
        fc1_weight, fc1_bias, fc2_weight, fc2_bias = (split or self.split())[expert]
        # frozen_linear: frozen experts may be stored in bf16 (``bsr.frozen_dtype``); otherwise F.linear
        hidden = self.drop(self.act(frozen_linear(tokens, fc1_weight, fc1_bias)))
        return self.drop(frozen_linear(hidden, fc2_weight, fc2_bias))

    def forward_batched(self, slots: torch.Tensor) -> torch.Tensor:
        """``[E, slots, dim] -> [E, slots, dim]``, expert e on row e: two batched matmuls over tutel's dispatch
        layout instead of one ``F.linear`` per expert."""
        # frozen experts may be stored in bf16 (``bsr.frozen_dtype``): cast per matmul, only the bf16 bank kept
        hidden = self.drop(self.act(frozen_batched_linear(slots, self.fc1_weight, self.fc1_bias)))
        return self.drop(frozen_batched_linear(hidden, self.fc2_weight, self.fc2_bias))

    def select_experts(self, index: torch.Tensor) -> "Experts":
        """A bank of only the experts in ``index`` (expert pruning); each parameter keeps its own dtype (a bf16-stored
        frozen weight, ``bsr.frozen_dtype``, beside an fp32 bias)."""
        kept = Experts(len(index), self.dim, self.hidden_features, copy.deepcopy(self.act), drop=self.drop.p)
        for name, parameter in self.named_parameters(recurse=False):
            getattr(kept, name).data = parameter.detach().index_select(0, index)
        return kept

    def expert_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``expert``'s ``fc1``/``fc2`` weights (in the bank's storage dtype)."""
        return self.fc1_weight[expert], self.fc2_weight[expert]

    def dense_mlp(self, expert: int) -> Mlp:
        """Expert ``expert`` as a timm ``Mlp`` (a layer pruned to one expert becomes dense), in the dtype of its
        :meth:`expert_weights`."""
        fc1, fc2 = self.expert_weights(expert)
        dense = Mlp(self.dim, self.hidden_features, drop=self.drop.p).to(fc1.device, fc1.dtype)
        dense.act = copy.deepcopy(self.act)
        with torch.no_grad():
            dense.fc1.weight.copy_(fc1)
            dense.fc1.bias.copy_(self.fc1_bias[expert])
            dense.fc2.weight.copy_(fc2)
            dense.fc2.bias.copy_(self.fc2_bias[expert])
        return dense

    @classmethod
    def upcycle(cls, mlp: nn.Module, num_experts: int, hidden_features: Optional[int] = None) -> "Experts":
        """Experts that each start as an exact copy of ``mlp`` (a timm ``Mlp``).

        With ``hidden_features`` different from the dense width an exact copy is impossible: the experts are
        then freshly initialised (truncated normal, std 0.02) and only the activation is taken over.
        """
        if not isinstance(mlp, Mlp) or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.norm, nn.Identity):
            raise UnsupportedModelError(
                f"moe: cannot upcycle a {type(mlp).__name__}; accepted: timm.layers.Mlp with linear fc1/fc2 "
                "and no inner norm (ViT/DeiT/EVA MLPs), SwiGLU or GluMlp (EVA-02; see gated_experts.py)")
        dense_hidden, dim = mlp.fc1.weight.shape
        hidden = hidden_features or dense_hidden
        experts = cls(num_experts, dim, hidden, copy.deepcopy(mlp.act), drop=mlp.drop1.p)
        experts = experts.to(device=mlp.fc1.weight.device, dtype=mlp.fc1.weight.dtype)
        if hidden == dense_hidden:
            with torch.no_grad():
                experts.fc1_weight.copy_(mlp.fc1.weight.expand(num_experts, -1, -1))
                experts.fc2_weight.copy_(mlp.fc2.weight.expand(num_experts, -1, -1))
                if mlp.fc1.bias is not None:
                    experts.fc1_bias.copy_(mlp.fc1.bias.expand(num_experts, -1))
                if mlp.fc2.bias is not None:
                    experts.fc2_bias.copy_(mlp.fc2.bias.expand(num_experts, -1))
        return experts
