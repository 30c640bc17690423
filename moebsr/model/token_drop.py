"""EViT-style token dropping: keep the patch tokens the CLS token attends to most, fuse the rest.

The CLS attention row is computed on its own (``q_cls @ k^T``, O(N) per head) next to the block's regular
attention, so timm's fused ``scaled_dot_product_attention`` path stays in use and the full N x N attention
matrix is never materialised just to read one row of it.

A backbone without a class token (``class_token=False``, the ``*_gap_*`` models) has no CLS row to read: its tokens
are ranked by the attention each one *receives*, averaged over every query and head (the rule of CLS-free token
pruning, e.g. Zero-TPrune and ATS's mean-attention variant); the scores again sum to 1 over the tokens, so fusing
weighs the dropped tokens the same way. It needs the full attention matrix (O(N^2) per head, computed beside the fused
kernel), which such a model pays in that block only.

Which tokens a block keeps is decided by a *ranking*: the block's own CLS attention (``decision: per_task``, and
every block of the shared trunk), or one ranking made on the shared stream and carried along in a
:class:`TokenSelection` (``decision: shared``), so that every task keeps the same tokens of an image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from timm.layers import Attention

from .errors import UnsupportedModelError

FUSED_TOKEN = -1  # origin of the fused token in TokenSelection.origin (it is no patch of the image)


def check_attention_supported(attn: torch.nn.Module) -> None:
    if type(attn) is not Attention:
        raise UnsupportedModelError(
            f"token_drop: blocks with {type(attn).__name__} attention are not supported; "
            "accepted: timm.layers.Attention (ViT/DeiT)")


def attention_with_cls_scores(attn: Attention, x: torch.Tensor, num_prefix_tokens: int = 1,
                              class_token: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention.forward`` that also returns the head-averaged CLS attention over the other tokens; without
    a ``class_token`` (token 0 is then a register or a patch), the attention each token receives, averaged over
    every query.

    Returns:
        ``(output [B, N, C], cls_scores [B, N - num_prefix_tokens])``; the scores of each row sum to at most 1
        (the rest of the attention goes to the prefix tokens).
    """
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    q, k, v = rearrange(attn.qkv(x), "b n (three h d) -> three b h n d", three=3, h=attn.num_heads)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    queries = q[:, :, :1] if class_token else q  # the CLS row, or every row (averaged below)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        ranking_attention = ((queries * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    else:
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        ranking_attention = weights[:, :, :1] if class_token else weights
        out = attn.attn_drop(weights) @ v
    out = attn.norm(rearrange(out, "b h n d -> b n (h d)"))
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    cls_scores = ranking_attention[..., num_prefix_tokens:].mean(dim=(1, 2))  # over heads and queries
    return out, cls_scores


def num_kept_tokens(num_patch_tokens: int, keep_rate: float) -> int:
    return min(num_patch_tokens, math.ceil(keep_rate * num_patch_tokens))


def select_tokens(
        x: torch.Tensor,
        cls_scores: torch.Tensor,
        keep_rate: float,
        fuse: bool,
        num_prefix_tokens: int = 1,
        ranking: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Keep the top ``ceil(keep_rate * P)`` of the P non-prefix tokens, in their original order.

    The kept tokens are the top of ``ranking`` (default: ``cls_scores``). With ``fuse`` the dropped tokens become
    one token appended at the end, ``sum_j a_j x_j`` over the dropped j with ``a_j`` their CLS attention in this
    block (EViT); it is treated as a patch token by later dropping stages.

    Returns:
        ``(tokens [B, prefix + kept (+1), C], kept_index [B, kept])``; ``kept_index`` (positions among the
        non-prefix tokens) is ``None`` when nothing is dropped.
    """
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    num_patches = patches.shape[1]
    keep = num_kept_tokens(num_patches, keep_rate)
    if keep >= num_patches:
        return x, None
    kept_index = (cls_scores if ranking is None else ranking).topk(keep, dim=1).indices.sort(dim=1).values
    kept = patches.gather(1, repeat(kept_index, "b k -> b k c", c=patches.shape[-1]))
    parts = [prefix, kept]
    if fuse:
        dropped_weight = cls_scores.scatter(1, kept_index, 0.0)
        parts.append(torch.einsum("bn,bnc->bc", dropped_weight.to(patches.dtype), patches)[:, None])
    return torch.cat(parts, dim=1), kept_index


@dataclass(frozen=True)
class TokenSelection:
    """What the dropping stages decided so far, per row of the batch (a value: every stage returns a new one).

    Attributes:
        origin: ``[R, P]`` for each non-prefix token still present, the index of the image patch it is
            (``FUSED_TOKEN`` for a fused token).
        ranking: ``[R, P]`` the shared ranking of the present tokens (``decision: shared``), or ``None`` while every
            block ranks by its own CLS attention. A fused token ranks by the summed scores of the tokens it holds.
        rope: ``[R, P, D]`` each present token's rotary embedding (sin and cos concatenated, timm's ``cat`` layout)
            for a backbone with rotary positions (EVA-02), ``None`` otherwise. Kept tokens carry their own patch's row,
            so later attentions rotate them exactly as the undropped model would. A fused token gets the identity
            rotation (sin 0, cos 1): it mixes many positions, no single one is right, and unrotated it attends by
            content alone, as the prefix tokens do (timm leaves them unrotated).
    """

    origin: torch.Tensor
    ranking: Optional[torch.Tensor] = None
    rope: Optional[torch.Tensor] = None

    @classmethod
    def start(cls, batch: int, num_patches: int, device: torch.device,
              rope: Optional[torch.Tensor] = None) -> "TokenSelection":
        return cls(torch.arange(num_patches, device=device).expand(batch, num_patches), rope=rope)

    def with_ranking(self, scores: torch.Tensor) -> "TokenSelection":
        return replace(self, ranking=scores.detach().float())  # a decision, not a path for gradients

    def keep(self, kept_index: torch.Tensor, fuse: bool) -> "TokenSelection":
        """The selection after keeping ``kept_index`` (and appending a fused token with ``fuse``)."""
        origin = self.origin.gather(1, kept_index)
        ranking = self.ranking.gather(1, kept_index) if self.ranking is not None else None
        rope = None
        if self.rope is not None:
            rope = self.rope.gather(1, repeat(kept_index, "b k -> b k d", d=self.rope.shape[-1]))
        if fuse:
            origin = torch.cat([origin, origin.new_full((origin.shape[0], 1), FUSED_TOKEN)], dim=1)
            if ranking is not None:
                dropped = self.ranking.scatter(1, kept_index, 0.0).sum(dim=1, keepdim=True)
                ranking = torch.cat([ranking, dropped], dim=1)
            if rope is not None:
                rope = torch.cat([rope, identity_rotation(rope.shape[0], rope.shape[-1], rope)], dim=1)
        return TokenSelection(origin, ranking, rope)

    def repeat(self, times: int) -> "TokenSelection":
        """One copy per task, stacked as the model stacks the batch (rows ``[t*B, (t+1)*B)`` are copy t)."""
        def stack(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if tensor is None else repeat(tensor, "b ... -> (t b) ...", t=times)
        return TokenSelection(stack(self.origin), stack(self.ranking), stack(self.rope))


def identity_rotation(rows: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """``[rows, 1, width]`` rotary rows that rotate by zero: sin 0 then cos 1 (timm's ``cat`` layout)."""
    half = like.new_zeros(rows, 1, width // 2)
    return torch.cat([half, half + 1], dim=-1)
