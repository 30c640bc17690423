"""EViT-style token dropping: keep the patch tokens the CLS token attends to most, fuse the rest.

The CLS attention row is computed on its own (``q_cls @ k^T``, O(N) per head) next to the block's regular
attention, so timm's fused ``scaled_dot_product_attention`` path stays in use and the full N x N attention
matrix is never materialised just to read one row of it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention


def check_attention_supported(attn: torch.nn.Module) -> None:
    if type(attn) is not Attention:
        raise ValueError(
            f"token_drop: blocks with {type(attn).__name__} attention are not supported; "
            "accepted: timm.layers.Attention (ViT/DeiT)")


def attention_with_cls_scores(attn: Attention, x: torch.Tensor, num_prefix_tokens: int = 1
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention.forward`` that also returns the head-averaged CLS attention over the other tokens.

    Returns:
        ``(output [B, N, C], cls_scores [B, N - num_prefix_tokens])``; the scores of each row sum to at most 1
        (the rest of the CLS token's attention goes to the prefix tokens).
    """
    batch, num_tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(x).reshape(batch, num_tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        cls_attention = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    else:
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        cls_attention = weights[:, :, :1]
        out = attn.attn_drop(weights) @ v
    out = out.transpose(1, 2).reshape(batch, num_tokens, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    cls_scores = cls_attention[:, :, 0, num_prefix_tokens:].mean(dim=1)
    return out, cls_scores


def num_kept_tokens(num_patch_tokens: int, keep_rate: float) -> int:
    return min(num_patch_tokens, math.ceil(keep_rate * num_patch_tokens))


def select_tokens(
        x: torch.Tensor,
        cls_scores: torch.Tensor,
        keep_rate: float,
        fuse: bool,
        num_prefix_tokens: int = 1,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Keep the top ``ceil(keep_rate * P)`` of the P non-prefix tokens by CLS score, in their original order.

    With ``fuse`` the dropped tokens become one token appended at the end, ``sum_j a_j x_j`` over the dropped
    j with ``a_j`` their CLS attention (EViT); it is treated as a patch token by later dropping stages.

    Returns:
        ``(tokens [B, prefix + kept (+1), C], kept_index [B, kept])``; ``kept_index`` (positions among the
        non-prefix tokens) is ``None`` when nothing is dropped.
    """
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    num_patches = patches.shape[1]
    keep = num_kept_tokens(num_patches, keep_rate)
    if keep >= num_patches:
        return x, None
    kept_index = cls_scores.topk(keep, dim=1).indices.sort(dim=1).values
    kept = patches.gather(1, kept_index[..., None].expand(-1, -1, patches.shape[-1]))
    parts = [prefix, kept]
    if fuse:
        dropped_weight = cls_scores.scatter(1, kept_index, 0.0)
        parts.append(torch.einsum("bn,bnc->bc", dropped_weight.to(patches.dtype), patches)[:, None])
    return torch.cat(parts, dim=1), kept_index
