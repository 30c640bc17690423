"""Top-k expert dispatch in plain PyTorch: tokens grouped by expert, each expert run on its own tokens.

Cost is proportional to ``tokens * top_k`` expert evaluations, unlike a dense every-token-through-every-
expert einsum whose cost grows with ``num_experts``. ``dispatch_dense_reference`` is that naive version,
kept as the ground truth the tests compare against.
"""

from __future__ import annotations

import torch

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
    flat_expert = expert_index.reshape(-1)
    flat_weight = expert_weight.reshape(-1)
    flat_token = torch.arange(num_tokens, device=tokens.device).repeat_interleave(top_k)
    active = flat_weight != 0
    if not bool(active.all()):
        flat_expert, flat_weight, flat_token = flat_expert[active], flat_weight[active], flat_token[active]
    order = torch.argsort(flat_expert, stable=True)
    sorted_token = flat_token[order]
    sorted_weight = flat_weight[order]
    counts = torch.bincount(flat_expert, minlength=experts.num_experts).tolist()
    output = tokens.new_zeros(num_tokens, experts.dim)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        token_ids = sorted_token[start:start + count]
        expert_out = experts.forward_expert(expert, tokens.index_select(0, token_ids))
        output.index_add_(0, token_ids, expert_out * sorted_weight[start:start + count, None])
        start += count
    return output


def dispatch_dense_reference(
        tokens: torch.Tensor,
        expert_index: torch.Tensor,
        expert_weight: torch.Tensor,
        experts: Experts,
) -> torch.Tensor:
    """Every token through every expert, then a gather of the chosen ones. Slow; for tests only."""
    every_expert = torch.stack([experts.forward_expert(e, tokens) for e in range(experts.num_experts)], dim=1)
    chosen = every_expert.gather(1, expert_index[..., None].expand(-1, -1, experts.dim))
    return (chosen * expert_weight[..., None]).sum(dim=1)
