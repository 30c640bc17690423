"""A ViT block that can route its MLP per task and drop tokens between its attention and its MLP.

It takes over the submodules of a timm ``Block`` under the same names (``norm1``, ``attn``, ``ls1``, ...), so
state-dict keys, pretrained weights and timm's ``group_matcher`` patterns stay valid. The forward is split
into an attention half and an MLP half because the shared trunk ends *inside* the first per-task MoE block:
its attention (and token dropping) is task-agnostic, its routed MLP is not.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from .adapters import bind_task_rows, has_task_parameters
from .errors import UnsupportedModelError
from .moe import MoEMlp, TaskRows
from .spec import check_keep_rate
from .token_drop import TokenSelection, attention_with_cls_scores, check_attention_supported, select_tokens


class MoEViTBlock(nn.Module):
    """Pre-norm transformer block; ``mlp`` is a dense timm ``Mlp`` or a routed :class:`MoEMlp`.

    Attributes:
        keep_rate: Patch-token keep rate of this block's dropping stage; ``None`` = no dropping here.
        fuse: Fold dropped tokens into one extra token.
        last_kept_index: Positions (among non-prefix tokens) kept by the latest forward, for inspection.
    """

    def __init__(
            self,
            block: Block,
            mlp: Optional[nn.Module] = None,
            keep_rate: Optional[float] = None,
            fuse: bool = True,
            num_prefix_tokens: int = 1,
            class_token: bool = True,
    ) -> None:
        super().__init__()
        self.adopt(block)
        self.mlp = mlp if mlp is not None else block.mlp
        self.num_prefix_tokens = num_prefix_tokens
        self.class_token = class_token  # without one, tokens rank by the attention they receive (token_drop.py)
        self.keep_rate: Optional[float] = None
        self.fuse = fuse
        self.set_keep_rate(keep_rate)
        self.last_kept_index: Optional[torch.Tensor] = None

    def adopt(self, block: nn.Module) -> None:
        """Take over ``block``'s modules under their timm names (all but its MLP)."""
        if type(block) is not Block:
            raise UnsupportedModelError(f"model: blocks of type {type(block).__name__} are not supported; "
                                        "accepted: timm.models.vision_transformer.Block (ViT/DeiT), "
                                        "timm.models.eva.EvaBlock (EVA/EVA-02)")
        self.norm1, self.attn, self.ls1, self.drop_path1 = block.norm1, block.attn, block.ls1, block.drop_path1
        self.norm2, self.ls2, self.drop_path2 = block.norm2, block.ls2, block.drop_path2

    def check_drop_supported(self) -> None:
        """Refuse, in one line, an attention whose CLS scores this block cannot compute."""
        check_attention_supported(self.attn)

    def attention(self, x: torch.Tensor, selection: TokenSelection) -> torch.Tensor:
        """The attention sub-layer on normed tokens (``selection``: the tokens present, for backbones that need it)."""
        return self.attn(x)

    def attention_and_scores(self, x: torch.Tensor, selection: TokenSelection) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`attention` and the scores that rank the patch tokens (see :func:`attention_with_cls_scores`)."""
        return attention_with_cls_scores(self.attn, x, self.num_prefix_tokens, self.class_token)

    def scale_attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls1(x)

    def scale_mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(x)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoEMlp)

    @property
    def routes_per_task(self) -> bool:
        return self.is_moe and self.mlp.router.per_task

    @property
    def attention_per_task(self) -> bool:
        """Its attention holds task-specific layers (task adapters): the task streams must split before it."""
        return has_task_parameters(self.attn)

    @property
    def mlp_per_task(self) -> bool:
        """Its MLP routes per task or holds task adapters: the task streams must split before it."""
        return self.routes_per_task or has_task_parameters(self.mlp)

    @property
    def drops_tokens(self) -> bool:
        return self.keep_rate is not None and self.keep_rate < 1.0

    def set_keep_rate(self, keep_rate: Optional[float]) -> None:
        if keep_rate is not None:
            self.check_drop_supported()
            keep_rate = check_keep_rate(keep_rate)
        self.keep_rate = keep_rate

    def forward_attention(self, x: torch.Tensor, selection: TokenSelection, make_ranking: bool = False,
                          task_rows: Optional[TaskRows] = None) -> tuple[torch.Tensor, TokenSelection]:
        """Attention residual, then token dropping if this block drops tokens.

        ``make_ranking``: this block's CLS attention becomes the shared ranking that this and every later dropping
        stage keep the top of (``decision: shared``); otherwise a block ranks by its own CLS attention unless
        ``selection`` already carries a ranking. ``task_rows``: which rows are which task's, for task adapters in
        the attention. Returns the new tokens and selection (nothing is mutated, so activation checkpointing can
        re-run it).
        """
        with bind_task_rows(task_rows):
            return self._attention(x, selection, make_ranking)

    def _attention(self, x: torch.Tensor, selection: TokenSelection, make_ranking: bool
                   ) -> tuple[torch.Tensor, TokenSelection]:
        if not (self.drops_tokens or make_ranking):
            return x + self.drop_path1(self.scale_attention(self.attention(self.norm1(x), selection))), selection
        attn_out, cls_scores = self.attention_and_scores(self.norm1(x), selection)
        x = x + self.drop_path1(self.scale_attention(attn_out))
        if make_ranking:
            selection = selection.with_ranking(cls_scores)
        if not self.drops_tokens:
            return x, selection
        x, kept_index = select_tokens(x, cls_scores, self.keep_rate, self.fuse, self.num_prefix_tokens,
                                      ranking=selection.ranking)
        self.last_kept_index = kept_index
        return x, (selection if kept_index is None else selection.keep(kept_index, self.fuse))

    def forward_mlp(self, x: torch.Tensor, task_rows: TaskRows) -> torch.Tensor:
        with bind_task_rows(task_rows):  # for task adapters in a dense MLP
            hidden = self.norm2(x)
            hidden = self.mlp(hidden, task_rows) if self.is_moe else self.mlp(hidden)
            return x + self.drop_path2(self.scale_mlp(hidden))

    def forward(self, x: torch.Tensor, task_rows: TaskRows) -> torch.Tensor:
        """The whole block on its own, dropping by its own CLS attention (the model drives the halves itself)."""
        selection = TokenSelection.start(x.shape[0], x.shape[1] - self.num_prefix_tokens, x.device)
        return self.forward_mlp(self.forward_attention(x, selection)[0], task_rows)

    def sublayer_modules(self, sublayer: str) -> list[nn.Module]:
        """The modules a BSR sub-layer name stands for in this block."""
        if sublayer == "attn":
            return [self.attn, self.ls1]
        if sublayer == "mlp":
            return [self.mlp.experts if self.is_moe else self.mlp, self.ls2]
        if sublayer == "router":
            return [self.mlp.router] if self.is_moe else []
        if sublayer == "norm":
            return [self.norm1, self.norm2]
        raise KeyError(sublayer)
