"""Top-k expert dispatch in plain PyTorch, two ways (``moe.dispatch``):

- ``grouped``: tokens sorted by expert, each expert run on its own contiguous chunk. Cost is proportional to the
  ``tokens * top_k`` assignments kept, but the chunk sizes are read back from the device once per MoE layer.
- ``padded``: with a capacity cap the slots per expert are a number known in advance, so tokens are scattered into
  ``[experts, capacity, dim]`` (tutel's layout), every expert runs on all its slots in one batched matmul, and the
  results are gathered back: nothing is read from the device, for the cost of the empty slots.

Both cost about ``top_k`` expert evaluations per token (padded: ``capacity_factor`` times that), unlike a dense
every-token-through-every-expert einsum whose cost grows with ``num_experts``. ``dispatch_dense_reference`` is that
naive version, the tests' ground truth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
    # the per-expert counts are then the layer's one read from the device (the chunk sizes must be known here).
    # Counted by index_add, not torch.bincount, which on CUDA reads its input's min and max back first.
    flat_expert = torch.where(flat_weight != 0, expert_index.reshape(-1), num_experts)
    order = torch.argsort(flat_expert, stable=True)
    counts = flat_expert.new_zeros(num_experts + 1).index_add_(0, flat_expert, torch.ones_like(flat_expert)).tolist()
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


def dispatch_padded(
        tokens: torch.Tensor,
        expert_index: torch.Tensor,
        expert_weight: torch.Tensor,
        experts: Experts,
        capacity: int,
) -> torch.Tensor:
    """The weighted sum of :func:`dispatch_grouped` with no read from the device, for a capacity-capped routing.

    Args:
        tokens: ``[T, dim]`` flat tokens.
        expert_index: ``[T, k]`` chosen experts.
        expert_weight: ``[T, k]`` gate weights; 0 marks an assignment the capacity cap dropped.
        experts: The expert bank.
        capacity: Slots per expert, at least the kept assignments of any expert (the sum of
            :func:`~moebsr.model.routing.expert_capacity` over the gates that routed ``tokens``).

    Returns:
        ``[T, dim]`` mixture output.
    """
    num_tokens, top_k = expert_index.shape
    num_experts, dim = experts.num_experts, tokens.shape[-1]
    flat_weight = expert_weight.reshape(-1)
    flat_expert = expert_index.reshape(-1)
    kept = flat_weight != 0
    # each kept assignment's position among its expert's kept assignments, in token order (a one-hot cumsum)
    one_hot = (flat_expert[:, None] == torch.arange(num_experts, device=flat_expert.device)) & kept[:, None]
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1
    kept = kept & (position < capacity)  # never false for a routing capped to ``capacity``
    # slot e * capacity + position; a dropped assignment goes to one extra slot that no expert reads
    slot = torch.where(kept, flat_expert * capacity + position, num_experts * capacity)
    every_assignment = tokens[:, None].expand(num_tokens, top_k, dim).reshape(-1, dim)
    slots = tokens.new_zeros(num_experts * capacity + 1, dim).index_add_(0, slot, every_assignment)
    expert_out = experts.forward_batched(slots[:-1].view(num_experts, capacity, dim))
    gathered = F.pad(expert_out.reshape(num_experts * capacity, dim), (0, 0, 0, 1)).index_select(0, slot)
    weight = torch.where(kept, flat_weight, 0)
    return (gathered * weight[:, None]).view(num_tokens, top_k, dim).sum(dim=1).to(tokens.dtype)


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
