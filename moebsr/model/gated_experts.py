"""Experts upcycled from a gated MLP (SwiGLU, as in EVA-02): ``fc2(norm(act(gate(x)) * value(x)))`` per expert.

timm builds EVA-02's MLP two ways: :class:`timm.layers.SwiGLU` (separate ``fc1_g``/``fc1_x``, used with the inner
norm of ``scale_mlp``) and :class:`timm.layers.GluMlp` (one packed ``fc1`` whose halves are the gate and the value).
Both become the same stacked bank here: ``fc1_*`` is the value path (so code that reads an :class:`Experts` bank's
``fc1``/``fc2`` still finds its matmuls), ``fc1_gate_*`` the gate path, and an inner LayerNorm gets one copy per
expert (``norm_weight``/``norm_bias``), because an upcycled expert must own every parameter of the dense MLP.
"""

from __future__ import annotations

import copy
import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import GluMlp, Mlp, SwiGLU

from .errors import UnsupportedModelError
from .experts import Experts
from .precision import frozen_linear


class GatedExperts(Experts):
    """``num_experts`` gated MLPs with shared activation, dropout and (optional) inner-LayerNorm epsilon."""

    def __init__(
            self,
            num_experts: int,
            dim: int,
            hidden_features: int,
            act_layer: nn.Module,
            drop: float = 0.0,
            norm_eps: Optional[float] = None,
            packed: Optional[str] = None,
    ) -> None:
        super().__init__(num_experts, dim, hidden_features, act_layer, drop)
        self.packed = packed  # upcycled from a GluMlp: "gate_first"/"gate_last"; None: a SwiGLU (see dense_mlp)
        self.fc1_gate_weight = nn.Parameter(torch.empty(num_experts, hidden_features, dim))
        self.fc1_gate_bias = nn.Parameter(torch.zeros(num_experts, hidden_features))
        nn.init.trunc_normal_(self.fc1_gate_weight, std=0.02)
        self.norm_eps = norm_eps
        if norm_eps is not None:
            self.norm_weight = nn.Parameter(torch.ones(num_experts, hidden_features))
            self.norm_bias = nn.Parameter(torch.zeros(num_experts, hidden_features))
        else:
            self.norm_weight = self.norm_bias = None

    def split(self) -> list[tuple[Optional[torch.Tensor], ...]]:
        """Each expert's ``(fc1, fc1 bias, fc2, fc2 bias, gate, gate bias, norm, norm bias)`` views (see Experts)."""
        names = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "fc1_gate_weight", "fc1_gate_bias",
                 "norm_weight", "norm_bias")
        parameters = [getattr(self, name) for name in names]
        return list(zip(*(p.unbind(0) if p is not None else (None,) * self.num_experts for p in parameters)))

    def forward_expert(self, expert: int, tokens: torch.Tensor, split: Optional[list] = None) -> torch.Tensor:
        fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate_weight, gate_bias, norm_weight, norm_bias = \
            (split or self.split())[expert]
        gate = frozen_linear(tokens, gate_weight, gate_bias)  # timm's order: gate, value, act(gate) * value
        hidden = self.drop(self.act(gate) * frozen_linear(tokens, fc1_weight, fc1_bias))
        if norm_weight is not None:
            hidden = F.layer_norm(hidden, (self.hidden_features,), norm_weight, norm_bias, self.norm_eps)
        return self.drop(frozen_linear(hidden, fc2_weight, fc2_bias))

    def forward_batched(self, slots: torch.Tensor) -> torch.Tensor:
        """``[E, slots, dim] -> [E, slots, dim]`` with batched matmuls (the padded dispatch)."""
        cast = not torch.is_autocast_enabled(slots.device.type)
        fc1_weight, gate_weight, fc2_weight = (w.to(slots.dtype) if cast else w
                                               for w in (self.fc1_weight, self.fc1_gate_weight, self.fc2_weight))
        gate = torch.baddbmm(self.fc1_gate_bias.unsqueeze(1), slots, gate_weight.transpose(1, 2))
        value = torch.baddbmm(self.fc1_bias.unsqueeze(1), slots, fc1_weight.transpose(1, 2))
        hidden = self.drop(self.act(gate) * value)
        if self.norm_weight is not None:
            hidden = F.layer_norm(hidden, (self.hidden_features,), eps=self.norm_eps)
            hidden = hidden * self.norm_weight.unsqueeze(1) + self.norm_bias.unsqueeze(1)
        return self.drop(torch.baddbmm(self.fc2_bias.unsqueeze(1), hidden, fc2_weight.transpose(1, 2)))

    def select_experts(self, index: torch.Tensor) -> "GatedExperts":
        """A bank of only the experts in ``index`` (expert pruning); each parameter keeps its dtype."""
        kept = GatedExperts(len(index), self.dim, self.hidden_features, copy.deepcopy(self.act), self.drop.p,
                            self.norm_eps, self.packed)
        for name, parameter in self.named_parameters(recurse=False):
            getattr(kept, name).data = parameter.detach().index_select(0, index)
        return kept

    def dense_mlp(self, expert: int) -> nn.Module:
        """Expert ``expert`` as the timm module it was upcycled from, ``SwiGLU`` or packed ``GluMlp`` (a layer pruned
        to one expert becomes dense), so the pruned model's state dict loads into the timm model of its name."""
        norm = functools.partial(nn.LayerNorm, eps=self.norm_eps) if self.norm_eps is not None else None
        if self.packed is None:
            dense = SwiGLU(self.dim, self.hidden_features, norm_layer=norm, drop=self.drop.p)
            pairs = [(dense.fc1_x, "fc1"), (dense.fc1_g, "fc1_gate")]
        else:
            dense = GluMlp(self.dim, 2 * self.hidden_features, act_layer=nn.SiLU, norm_layer=norm, drop=self.drop.p,
                           gate_last=self.packed == "gate_last")
            pairs = []
        dense = dense.to(self.fc1_weight.device, self.fc1_weight.dtype)
        dense.act = copy.deepcopy(self.act)
        pairs += [(dense.fc2, "fc2")] + ([(dense.norm, "norm")] if self.norm_eps is not None else [])
        with torch.no_grad():
            if self.packed is not None:
                halves = ["fc1", "fc1_gate"] if self.packed == "gate_last" else ["fc1_gate", "fc1"]
                dense.fc1.weight.copy_(torch.cat([getattr(self, f"{h}_weight")[expert] for h in halves]))
                dense.fc1.bias.copy_(torch.cat([getattr(self, f"{h}_bias")[expert] for h in halves]))
            for layer, name in pairs:
                layer.weight.copy_(getattr(self, f"{name}_weight")[expert])
                layer.bias.copy_(getattr(self, f"{name}_bias")[expert])
        return dense


def is_gated_mlp(mlp: Optional[nn.Module]) -> bool:
    """An MLP that upcycles into :class:`GatedExperts` (SwiGLU, GluMlp)."""
    return isinstance(mlp, (SwiGLU, GluMlp))


def _gated_parts(mlp: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """``(gate weight, gate bias, value weight, value bias)`` of a SwiGLU or GluMlp, in timm's roles."""
    if isinstance(mlp, SwiGLU):
        return mlp.fc1_g.weight, mlp.fc1_g.bias, mlp.fc1_x.weight, mlp.fc1_x.bias
    weights = mlp.fc1.weight.chunk(2, dim=0)
    biases = mlp.fc1.bias.chunk(2, dim=0) if mlp.fc1.bias is not None else (None, None)
    gate, value = (1, 0) if mlp.gate_last else (0, 1)  # GluMlp: x1 * act(x2) if gate_last else act(x1) * x2
    return weights[gate], biases[gate], weights[value], biases[value]


def upcycle_experts(mlp: nn.Module, num_experts: int, hidden_features: Optional[int] = None,
                    expert_rank: Optional[int] = None) -> Experts:
    """Experts that each start as an exact copy of ``mlp``: a timm ``Mlp`` (ViT/DeiT, EVA), ``SwiGLU`` or
    ``GluMlp`` (EVA-02). With another ``hidden_features`` the experts start fresh (see :meth:`Experts.upcycle`);
    with ``expert_rank`` they are low-rank deltas of ``mlp`` (:class:`~.low_rank_experts.LowRankExperts`)."""
    if expert_rank is not None:
        from .low_rank_experts import LowRankExperts
        return LowRankExperts.upcycle(mlp, num_experts, hidden_features, expert_rank)
    if isinstance(mlp, Mlp):
        return Experts.upcycle(mlp, num_experts, hidden_features)
    accepted = "accepted: timm.layers.Mlp (ViT/DeiT/EVA), SwiGLU or GluMlp (EVA-02) with linear layers"
    if not isinstance(mlp, (SwiGLU, GluMlp)) or not isinstance(mlp.fc2, nn.Linear):
        raise UnsupportedModelError(f"moe: cannot upcycle a {type(mlp).__name__}; {accepted}")
    if isinstance(mlp.norm, nn.LayerNorm) and mlp.norm.elementwise_affine and mlp.norm.bias is not None:
        norm_eps: Optional[float] = mlp.norm.eps
    elif isinstance(mlp.norm, nn.Identity):
        norm_eps = None
    else:
        raise UnsupportedModelError(f"moe: cannot upcycle a {type(mlp).__name__} with a {type(mlp.norm).__name__} "
                                    f"inside; {accepted} and an inner LayerNorm or none")
    gate_weight, gate_bias, value_weight, value_bias = _gated_parts(mlp)
    dense_hidden, dim = value_weight.shape
    hidden = hidden_features or dense_hidden
    packed = None if isinstance(mlp, SwiGLU) else ("gate_last" if mlp.gate_last else "gate_first")
    experts = GatedExperts(num_experts, dim, hidden, copy.deepcopy(mlp.act), mlp.drop1.p, norm_eps, packed)
    experts = experts.to(device=value_weight.device, dtype=value_weight.dtype)
    if hidden != dense_hidden:
        return experts
    copies = [("fc1_gate", gate_weight, gate_bias), ("fc1", value_weight, value_bias),
              ("fc2", mlp.fc2.weight, mlp.fc2.bias)]
    if norm_eps is not None:
        copies.append(("norm", mlp.norm.weight, mlp.norm.bias))
    with torch.no_grad():
        for name, weight, bias in copies:
            getattr(experts, f"{name}_weight").copy_(weight.expand(num_experts, *weight.shape))
            if bias is not None:
                getattr(experts, f"{name}_bias").copy_(bias.expand(num_experts, *bias.shape))
    return experts
