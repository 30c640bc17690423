"""EVA / EVA-02 backbones (``timm.models.eva.Eva``): rotary positions that survive token dropping.

An EVA block differs from a ViT block in three ways that matter here: its attention rotates the non-prefix queries
and keys by a rotary table (one row per patch, ``rope``), its layer scales are bare parameters (``gamma_1``,
``gamma_2``), and EVA-02's MLP is a SwiGLU (upcycled by :mod:`.gated_experts`). The rotary table is *per token*:
once a block drops tokens, row i of the table no longer belongs to token i. So the rows travel with the tokens, in
:attr:`TokenSelection.rope`: gathered by each kept token's origin at every drop, so every later attention rotates a
kept token exactly as the undropped model rotates that patch (a fused token gets the identity rotation, see there).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock

from .block import MoEViTBlock
from .errors import UnsupportedModelError
from .moe import TaskRows
from .token_drop import TokenSelection

ACCEPTED = ("accepted: timm Eva models (EVA/EVA-02: eva02_*, eva_giant_*) with pre-norm EvaBlocks and one rotary "
            "table for every block")


def is_eva(backbone: nn.Module) -> bool:
    return isinstance(backbone, Eva)


def check_eva(backbone: Eva) -> None:
    """Refuse, in one line, the Eva variants whose rotary positions this module cannot carry."""
    name = (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture") or type(backbone).__name__
    if getattr(backbone, "rope_mixed", False):
        raise UnsupportedModelError(f"model: {name} uses a rotary table per block (rope_type='mixed'); {ACCEPTED}")
    if backbone.rope is not None and not hasattr(backbone.rope, "feat_shape"):
        raise UnsupportedModelError(f"model: {name} uses a {type(backbone.rope).__name__} rotary embedding; "
                                    f"{ACCEPTED}")
    for block in backbone.blocks:
        if type(block) is not EvaBlock:
            raise UnsupportedModelError(f"model: {name} has {type(block).__name__} blocks; {ACCEPTED}")


def embed_eva(backbone: Eva, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """timm's stem (patch and position embeddings, patch dropout, pre-norm) and each row's rotary table
    ``[B, P, D]`` (``None`` without rotary positions)."""
    x, rope = backbone._pos_embed(backbone.patch_embed(images))
    x = backbone.norm_pre(x)
    if rope is None:
        return x, None
    if rope.ndim == 2:  # one table for every image: a view, nothing copied
        return x, rope.expand(x.shape[0], *rope.shape)
    if rope.ndim == 4 and rope.shape[1] == 1:  # patch dropout gathered a table per image, [B, 1, P, D]
        return x, rope.squeeze(1)
    raise UnsupportedModelError(f"model: a rotary table of shape {tuple(rope.shape)} is not supported; {ACCEPTED}")


def rope_of(selection: TokenSelection) -> Optional[torch.Tensor]:
    """The present tokens' rotary rows as EvaAttention takes them: ``[R, 1, P, D]`` (broadcast over heads)."""
    return None if selection.rope is None else selection.rope.unsqueeze(1)


def _qkv(attn: EvaAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v`` ``[B, heads, N, head_dim]`` exactly as ``EvaAttention.forward`` computes them."""
    batch, tokens, _ = x.shape
    if attn.qkv is None:
        return tuple(projection(x).reshape(batch, tokens, attn.num_heads, -1).transpose(1, 2)
                     for projection in (attn.q_proj, attn.k_proj, attn.v_proj))
    if attn.q_bias is None:
        qkv = attn.qkv(x)
    else:
        qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        if attn.qkv_bias_separate:
            qkv = attn.qkv(x)
            qkv += qkv_bias
        else:
            qkv = F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)
    return qkv.reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def eva_attention_with_cls_scores(attn: EvaAttention, x: torch.Tensor, rope: Optional[torch.Tensor],
                                  num_prefix_tokens: int = 1, class_token: bool = True
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``EvaAttention.forward(x, rope)`` that also returns the scores that rank the patch tokens (as
    :func:`~moebsr.model.token_drop.attention_with_cls_scores`), from the *rotated* queries and keys the attention
    itself uses: the ranking is the CLS row of this very attention."""
    batch, tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    q, k, v = _qkv(attn, x)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        prefix, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :prefix], apply_rot_embed_cat(q[:, :, prefix:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :prefix], apply_rot_embed_cat(k[:, :, prefix:], rope, half=half)], dim=2).type_as(v)
    queries = q[:, :, :1] if class_token else q
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
        ranking_attention = ((queries * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    else:
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        ranking_attention = weights[:, :, :1] if class_token else weights
        out = attn.attn_drop(weights) @ v
    out = attn.norm(out.transpose(1, 2).reshape(batch, tokens, -1))
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, ranking_attention[..., num_prefix_tokens:].mean(dim=(1, 2))


class EvaMoEViTBlock(MoEViTBlock):
    """:class:`MoEViTBlock` for a timm ``EvaBlock``: same halves, rotary rows from the selection, ``gamma_*`` scales.

    It keeps the EvaBlock's names (``norm1``, ``attn``, ``gamma_1``, ``mlp``, ...), so timm's state-dict keys stay
    valid outside the MoE MLPs.
    """

    def adopt(self, block: nn.Module) -> None:
        if type(block) is not EvaBlock:
            raise UnsupportedModelError(f"model: blocks of type {type(block).__name__} are not supported in an Eva; "
                                        "accepted: timm.models.eva.EvaBlock")
        self.norm1, self.attn, self.drop_path1 = block.norm1, block.attn, block.drop_path1
        self.norm2, self.drop_path2 = block.norm2, block.drop_path2
        self.gamma_1: Optional[nn.Parameter] = block.gamma_1
        self.gamma_2: Optional[nn.Parameter] = block.gamma_2

    def check_drop_supported(self) -> None:
        if type(self.attn) is not EvaAttention:
            raise UnsupportedModelError(f"token_drop: Eva blocks with {type(self.attn).__name__} attention are not "
                                        "supported; accepted: timm.models.eva.EvaAttention (EVA/EVA-02)")

    def attention(self, x: torch.Tensor, selection: TokenSelection) -> torch.Tensor:
        return self.attn(x, rope=rope_of(selection))

    def attention_and_scores(self, x: torch.Tensor, selection: TokenSelection) -> tuple[torch.Tensor, torch.Tensor]:
        return eva_attention_with_cls_scores(self.attn, x, rope_of(selection), self.num_prefix_tokens,
                                             self.class_token)

    def scale_attention(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.gamma_1 is None else self.gamma_1 * x  # timm's order of operands

    def scale_mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.gamma_2 is None else self.gamma_2 * x

    def forward(self, x: torch.Tensor, task_rows: TaskRows, rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The whole block on its own; ``rope``: the rotary table ``[P, D]`` of the tokens in ``x``."""
        batch, patches = x.shape[0], x.shape[1] - self.num_prefix_tokens
        rows = rope.expand(batch, *rope.shape) if rope is not None and rope.ndim == 2 else rope
        selection = TokenSelection.start(batch, patches, x.device, rows)
        return self.forward_mlp(self.forward_attention(x, selection)[0], task_rows)

    def sublayer_modules(self, sublayer: str) -> list[nn.Module]:
        if sublayer == "attn":
            return [self.attn, self.gamma_1]
        if sublayer == "mlp":
            return [self.mlp.experts if self.is_moe else self.mlp, self.gamma_2]
        return super().sublayer_modules(sublayer)
