"""Top-k expert dispatch in plain PyTorch: tokens grouped by expert, each expert run on its own tokens.

Cost is proportional to ``tokens * top_k`` expert evaluations, unlike a dense every-token-through-every-
expert einsum whose cost grows with ``num_experts``. ``dispatch_dense_reference`` is that naive version,
kept as the ground truth the tests compare against.
"""

from __future__ import annotations

import torch
from einops import repeat

from .experts import Experts


def dispatch_grouped(
        tokens: torch.Tensor,
        expert_index: torch.Tensor,
        expert_weight: torch.Tensor,
        experts: Experts,
) -> torch.Tensor:
    """Weighted sum of each token's chosen experts.

    Args:
        tokens: ``[T, dim]`` flat tokens.
        expert_index: ``[T, k]`` chosen experts.
        expert_weight: ``[T, k]`` gate weights; assignments with weight 0 are skipped entirely.
        experts: The expert bank.

    Returns:
        ``[T, dim]`` mixture output.
    """
    num_tokens, top_k = expert_index.shape
    num_experts = experts.num_experts
    flat_weight = expert_weight.reshape(-1)
    flat_token = repeat(torch.arange(num_tokens, device=tokens.device), "t -> (t k)", k=top_k)
    # assignments the capacity cap dropped (weight 0) sort into a last bucket, ``num_experts``, that never runs:
    # the per-expert counts are then the layer's one read from the device (the chunk sizes must be known here)
    flat_expert = torch.where(flat_weight != 0, expert_index.reshape(-1), num_experts)
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.bincount(flat_expert, minlength=num_experts + 1).tolist()
    kept = sum(counts[:num_experts])
    output = tokens.new_zeros(num_tokens, experts.dim)
    if kept == 0:  # every assignment dropped by the capacity cap
        return output
    order = order[:kept]
    sorted_token = flat_token[order]
    # one gather in expert order, one run per expert on its contiguous chunk, one scatter back
    chunks = tokens.index_select(0, sorted_token).split(counts[:num_experts])
    weights = experts.split()
    expert_out = torch.cat([experts.forward_expert(e, chunk, weights) for e, chunk in enumerate(chunks) if len(chunk)])
    return output.index_add_(0, sorted_token, (expert_out * flat_weight[order, None]).to(output.dtype))


def dispatch_dense_reference(
        tokens: torch.Tensor,
        expert_index: torch.Tensor,
        expert_weight: torch.Tensor,
        experts: Experts,
) -> torch.Tensor:
    """Every token through every expert, then a gather of the chosen ones. Slow; for tests only."""
    weights = experts.split()
    every_expert = torch.stack([experts.forward_expert(e, tokens, weights) for e in range(experts.num_experts)], dim=1)
    chosen = every_expert.gather(1, expert_index[..., None].expand(-1, -1, experts.dim))
    return (chosen * expert_weight[..., None]).sum(dim=1)
