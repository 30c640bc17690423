"""MoE-ViT: a timm ViT/DeiT or EVA/EVA-02 with per-task routed MoE blocks, token dropping, BSR and one head per task.

Data flow of ``forward(images, tasks)``: the stem and the blocks before the first trainable one run under
``torch.no_grad()`` (they keep no activations); up to the first task-specific layer (a per-task-routed MoE MLP,
or a task adapter, which splits the streams before its block's attention) every task shares one pass over the
images (including its token-dropping decisions); from there the batch is stacked once per task (rows
``[t*B, (t+1)*B)`` belong to task t) so every later layer, expert dispatch and task adapters included, still runs
as one batched computation; the pooled features of each task's rows go to that task's head.

Token dropping after that split stays shared across tasks (``token_drop_decision="shared"``): the last attention
every task shares (that of the first per-task-routed block, or of the block before the first adapted attention)
ranks the tokens once per image, and every later dropping stage keeps the top of that ranking among the tokens
still present. An image
therefore keeps the same tokens for every task, and a task's output does not depend on which other tasks share
its batch. ``"per_task"`` lets every stage after the split rank by its own task's CLS attention instead.

The forward is cut into pieces that pass a :class:`TrunkState` along (``start_trunk``, ``run_blocks``,
``finish_features``), so that the frozen trunk's result can be computed once and continued from later
(``forward_frozen_trunk`` / ``forward(..., trunk=state)``: the trunk cache).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from einops import repeat
from timm.layers import RmsNorm
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint

from .block import MoEViTBlock
from .bsr import SUBLAYERS, ResolvedBSRPlan, set_requires_grad
from .eva import embed_eva, is_eva
from .moe import MoEMlp, TaskRows
from .spec import check_decision
from .token_drop import TokenSelection, num_kept_tokens

HeadFactory = Union[int, nn.Module, Callable[[int], nn.Module]]
SplitPoint = tuple[int, str]  # (block, "attn" | "mlp"): the task streams split before that half of that block
NORM_TYPES = tuple(t for t in (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, RmsNorm,
                               getattr(nn, "RMSNorm", None)) if t is not None)


@dataclass
class TrunkState:
    """The stream between two blocks: what the rest of a forward continues from.

    Attributes:
        tokens: ``[rows, N, C]``; one row per image while ``shared``, else one per (task, image), stacked by task.
        selection: What the dropping stages so far kept, per row.
        tasks: The tasks of the forward, in order.
        batch: Images in the batch.
        task_rows: Which rows belong to which task (while shared, every task reads rows ``[0, batch)``).
        shared: Whether the stream is still one for every task (no per-task routing so far).
        kept: For each dropping block so far, the kept patches' origin and whether the stream was shared then.
    """

    tokens: torch.Tensor
    selection: TokenSelection
    tasks: list[str]
    batch: int
    task_rows: Optional[TaskRows] = None
    shared: bool = True
    kept: dict[int, tuple[torch.Tensor, bool]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task_rows is None:
            self.task_rows = [(self.tasks[0], 0, self.batch)]  # the shared trunk: one pass, any task's gate


class MoEViT(nn.Module):
    """Multitask MoE-ViT around a timm ``VisionTransformer`` or ``Eva`` (``backbone``) whose blocks were replaced.

    Build it with :func:`moebsr.model.create_moevit`. ``backbone`` keeps timm's module names, so
    ``backbone.state_dict()`` outside the MoE MLPs is a timm state dict.
    """

    def __init__(self, backbone: Union[VisionTransformer, Eva], heads: Mapping[str, nn.Module],
                 token_drop_decision: str = "shared") -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads))
        self.grad_checkpointing = False
        self.token_drop_decision = check_decision(token_drop_decision)
        self.last_kept_tokens: dict[int, dict[str, torch.Tensor]] = {}
        # a task model exported from a multitask one keeps that model's split point (see task_split_point)
        self.origin_split_point: Optional[SplitPoint] = None

    # ---- introspection -------------------------------------------------------------------------------------
    @property
    def blocks(self) -> Sequence[MoEViTBlock]:
        return self.backbone.blocks  # type: ignore[return-value]

    @property
    def depth(self) -> int:
        return len(self.backbone.blocks)

    @property
    def task_names(self) -> list[str]:
        return list(self.heads)

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return self.backbone.pretrained_cfg

    @property
    def moe_blocks(self) -> tuple[int, ...]:
        return tuple(i for i, block in enumerate(self.blocks) if block.is_moe)

    @property
    def token_drop_blocks(self) -> tuple[int, ...]:
        return tuple(i for i, block in enumerate(self.blocks) if block.drops_tokens)

    def moe_layers(self) -> dict[int, MoEMlp]:
        return {i: block.mlp for i, block in enumerate(self.blocks) if block.is_moe}

    def stem_parameters(self) -> list[nn.Parameter]:
        backbone = self.backbone
        tokens = [getattr(backbone, name, None) for name in ("cls_token", "reg_token", "pos_embed")]
        modules = [backbone.patch_embed, backbone.norm_pre, getattr(backbone, "rope", None)]  # rope: EVA's table
        return [p for p in tokens if isinstance(p, nn.Parameter)] + \
            [p for m in modules if m is not None for p in m.parameters()]

    def first_grad_block(self) -> int:
        """Index of the first block that needs autograd; -1 if the stem does, ``depth`` if no block does.

        Derived from ``requires_grad`` at every call, so freezing done by hand is honoured too.
        """
        if any(p.requires_grad for p in self.stem_parameters()):
            return -1
        for index, block in enumerate(self.blocks):
            if any(p.requires_grad for p in block.parameters()):
                return index
        return self.depth

    def tokens_per_block(self) -> list[int]:
        """Tokens entering each block's MLP for the backbone's image size (after that block's dropping)."""
        prefix = self.backbone.num_prefix_tokens
        num_tokens = self.backbone.patch_embed.num_patches + prefix
        counts = []
        for block in self.blocks:
            if block.drops_tokens:
                patches = num_tokens - prefix
                kept = num_kept_tokens(patches, block.keep_rate)
                if kept < patches:
                    num_tokens = prefix + kept + (1 if block.fuse else 0)
            counts.append(num_tokens)
        return counts

    def task_split_point(self) -> Optional[SplitPoint]:
        """Where the task streams of a joint batch split: where task-specific parameters first appear.

        ``(block, "attn")``: before the attention of the first block whose attention holds task adapters;
        ``(block, "mlp")``: before the MLP of the first block whose MLP routes per task (or holds task adapters);
        ``None`` when nothing is task-specific. A task model exported from a multitask one keeps the split point of
        its origin (``origin_split_point``), even where export merged the adapters or pruning made an MLP dense, so
        its token dropping ranks by the same attention.
        """
        if self.origin_split_point is not None:
            return self.origin_split_point
        for index, block in enumerate(self.blocks):
            if block.attention_per_task:
                return index, "attn"
            if block.mlp_per_task:
                return index, "mlp"
        return None

    def ranking_block(self) -> Optional[int]:
        """The block whose CLS attention ranks the tokens for every later dropping stage (``decision: shared``).

        It is the last block whose attention every task shares: the split block itself when the streams split at
        its MLP (its attention is still shared), the block before it when they split at its attention. ``None``
        when no stage comes after it (or dropping is per task, or nothing is task-specific): then every stage
        already ranks on a stream all tasks share, or by its own task's attention.
        """
        split = self.task_split_point()
        if self.token_drop_decision != "shared" or split is None:
            return None
        ranking = split[0] if split[1] == "mlp" else split[0] - 1
        if ranking < 0 and self.token_drop_blocks:
            raise ValueError("token_drop.decision: shared needs an attention every task shares, but task adapters "
                             "start in block 0's attention; accepted: adapters.blocks from block 1 on, or "
                             "token_drop.decision=per_task")
        if not any(i > ranking for i in self.token_drop_blocks):
            return None
        return ranking

    def set_keep_rate(self, keep_rate: Optional[float]) -> None:
        """Use ``keep_rate`` at every block that drops tokens (e.g. to evaluate other token budgets)."""
        for block in self.blocks:
            if block.keep_rate is not None:
                block.set_keep_rate(keep_rate)

    # ---- BSR -----------------------------------------------------------------------------------------------
    def apply_bsr(self, plan: ResolvedBSRPlan) -> None:
        """Freeze everything, then unfreeze what the plan names. Heads always train."""
        self.requires_grad_(False)
        for index in plan.trainable_blocks:
            for sublayer in SUBLAYERS:
                if sublayer in plan.sublayers_of(index):
                    set_requires_grad(self.blocks[index].sublayer_modules(sublayer), True)
        if plan.train_final_norm:
            set_requires_grad([self.backbone.norm, self.backbone.fc_norm], True)
        if plan.train_embeddings:
            set_requires_grad(self.stem_parameters(), True)
        self.heads.requires_grad_(True)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def frozen_modules(self) -> list[nn.Module]:
        """The stem (when it does not train) and every block none of whose parameters train."""
        backbone = self.backbone
        stem = [m for m in (backbone.patch_embed, backbone.pos_drop, backbone.patch_drop, backbone.norm_pre,
                            getattr(backbone, "rope", None)) if m is not None]  # an Eva: rope; no patch_drop at 0
        frozen = stem if not any(p.requires_grad for p in self.stem_parameters()) else []
        return frozen + [block for block in self.blocks if not any(p.requires_grad for p in block.parameters())]

    def train(self, mode: bool = True) -> "MoEViT":
        """Train mode for what trains; frozen modules stay in eval mode (timm's freeze convention).

        A frozen block is a fixed function: no stochastic depth or dropout in it, in training as at inference, so
        the trainable blocks see the features they will see at test time. Derived from ``requires_grad`` at each
        call: after freezing by hand, call ``train()`` again.
        """
        super().train(mode)
        if mode:
            for module in self.frozen_modules():
                module.eval()
        return self

    # ---- timm compatibility --------------------------------------------------------------------------------
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay by their role: tokens and position embeddings (timm's list), every
        bias (the experts' stacked ``[E, ...]`` biases too, which timm's ``ndim <= 1`` rule misses), every norm
        (EVA-02 experts' stacked inner norms too)."""
        names = {f"backbone.{name}" for name in self.backbone.no_weight_decay()}
        for module_name, module in self.named_modules():
            is_norm = isinstance(module, NORM_TYPES)
            for name, _ in module.named_parameters(recurse=False):
                if is_norm or name == "bias" or name.endswith(("_bias", "norm_weight")):  # experts' inner norms
                    names.add(f"{module_name}.{name}" if module_name else name)
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        matcher = self.backbone.group_matcher(coarse)
        return {key: _prefix_pattern(value, "backbone.") for key, value in matcher.items()}

    def aux_losses(self) -> dict[int, torch.Tensor]:
        """Load-balancing loss of each MoE layer from the latest forward."""
        return {i: layer.aux_loss for i, layer in self.moe_layers().items() if layer.aux_loss is not None}

    def aux_loss(self) -> torch.Tensor:
        """Sum of :meth:`aux_losses`; zero when there are no MoE layers."""
        losses = list(self.aux_losses().values())
        if losses:
            return torch.stack(losses).sum()
        return torch.zeros((), device=next(self.backbone.parameters()).device)  # a model may have no class token

    # ---- forward -------------------------------------------------------------------------------------------
    def check_tasks(self, tasks: Union[str, Sequence[str]]) -> list[str]:
        task_list = [tasks] if isinstance(tasks, str) else list(tasks)
        if not task_list:
            raise ValueError(f"tasks: empty; accepted: one or more of {', '.join(self.heads)}")
        for task in task_list:
            if task not in self.heads:
                raise ValueError(f"tasks: unknown task {task!r}; accepted: {', '.join(self.heads)}")
        if len(set(task_list)) != len(task_list):
            raise ValueError(f"tasks: duplicate task in {task_list}")
        return task_list

    def forward_features(self, images: torch.Tensor, tasks: Union[str, Sequence[str]]
                         ) -> tuple[torch.Tensor, TaskRows]:
        """Tokens after the final norm, ``[rows, N, C]``, and which rows belong to which task.

        Also records :attr:`last_kept_tokens`: for each dropping block, for each task, the image patches it kept.
        """
        state = self.start_trunk(images, self.check_tasks(tasks))
        return self.finish_features(self.run_blocks(state, 0, self.depth))

    def start_trunk(self, images: torch.Tensor, tasks: Sequence[str]) -> TrunkState:
        """The stream entering block 0: patch and position embeddings, one row per image (no task split yet)."""
        backbone = self.backbone
        rope = None  # each token's rotary row, for an EVA-02 (eva.py)
        with _no_grad_if(self.first_grad_block() >= 0):
            if is_eva(backbone):
                x, rope = embed_eva(backbone, images)
            else:
                x = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(images))))
        batch = images.shape[0]
        selection = TokenSelection.start(batch, x.shape[1] - backbone.num_prefix_tokens, x.device, rope)
        return TrunkState(x, selection, list(tasks), batch)

    def forward_frozen_trunk(self, images: torch.Tensor, tasks: Union[str, Sequence[str]]) -> TrunkState:
        """The stream after the blocks before the first trainable one: a fixed function of the images (frozen blocks
        run in eval mode and without autograd), which :class:`moebsr.training.trunk_cache.TrunkCache` stores per
        image."""
        return self.run_blocks(self.start_trunk(images, self.check_tasks(tasks)), 0, max(self.first_grad_block(), 0))

    def run_blocks(self, state: TrunkState, start: int, end: int) -> TrunkState:
        """Blocks ``[start, end)`` on ``state``; blocks before the first trainable one run without autograd."""
        grad_from = self.first_grad_block()
        ranking_block = self.ranking_block()
        x, selection, task_rows, kept = state.tokens, state.selection, state.task_rows, dict(state.kept)
        task_list, batch, shared = state.tasks, state.batch, state.shared
        split = self.task_split_point() if len(task_list) > 1 else None
        for index in range(start, end):
            block = self.blocks[index]
            with _no_grad_if(index < grad_from):
                use_checkpoint = self.grad_checkpointing and index >= grad_from and torch.is_grad_enabled()
                if shared and split == (index, "attn"):
                    x, selection, task_rows = _stack_per_task(x, selection, task_list)
                    shared = False
                attention_args = (x, selection, index == ranking_block, task_rows)
                x, selection = checkpoint(block.forward_attention, *attention_args, use_reentrant=False) \
                    if use_checkpoint else block.forward_attention(*attention_args)
                if shared and split == (index, "mlp"):
                    x, selection, task_rows = _stack_per_task(x, selection, task_list)
                    shared = False
                if block.drops_tokens:
                    kept[index] = (selection.origin, shared)
                x = checkpoint(block.forward_mlp, x, task_rows, use_reentrant=False) if use_checkpoint \
                    else block.forward_mlp(x, task_rows)
        return TrunkState(x, selection, task_list, batch, task_rows, shared, kept)

    def finish_features(self, state: TrunkState) -> tuple[torch.Tensor, TaskRows]:
        """Final norm of the stream after the last block; records :attr:`last_kept_tokens`."""
        x = self.backbone.norm(state.tokens)  # records nothing for autograd when frozen and fed by a no-grad trunk
        task_rows = state.task_rows if not state.shared else [(task, 0, state.batch) for task in state.tasks]
        self.last_kept_tokens = {
            index: {task: origin if was_shared else origin[start:end] for task, start, end in task_rows}
            for index, (origin, was_shared) in state.kept.items()}
        return x, task_rows

    def forward_from_trunk(self, state: TrunkState) -> dict[str, torch.Tensor]:
        """Logits from a :meth:`forward_frozen_trunk` state (computed now or read back from a cache)."""
        features, task_rows = self.finish_features(self.run_blocks(state, max(self.first_grad_block(), 0),
                                                                   self.depth))
        return self.forward_heads(features, task_rows)

    @torch.no_grad()
    def kept_tokens(self, images: torch.Tensor, tasks: Union[str, Sequence[str]]) -> dict[int, dict[str, torch.Tensor]]:
        """Which image patches each dropping block keeps: ``{block: {task: [B, kept] patch indices}}``.

        Patch indices count row-major over the patch grid of ``images``; a fused token (it holds the dropped
        patches, see :func:`select_tokens`) appears as ``FUSED_TOKEN`` (-1). With ``decision: shared`` the tensors
        are equal across tasks at every block. Runs a forward in the model's current mode.
        """
        self.forward_features(images, tasks)
        return self.last_kept_tokens

    def forward_heads(self, features: torch.Tensor, task_rows: TaskRows) -> dict[str, torch.Tensor]:
        pooled = self.backbone.forward_head(features, pre_logits=True)
        return {task: self.heads[task](pooled[start:end]) for task, start, end in task_rows}

    def forward(self, images: torch.Tensor, tasks: Union[str, Sequence[str]], trunk: Optional[TrunkState] = None
                ) -> dict[str, torch.Tensor]:
        """Logits for each task in ``tasks``, all from the same images: ``{task: [B, outputs]}``.

        ``trunk``: the :meth:`forward_frozen_trunk` state of these images (e.g. read from a trunk cache); the forward
        then starts at the first trainable block. It goes through ``forward`` (not a method of its own) so that a
        DDP-wrapped model still sees the call and reduces the gradients."""
        if trunk is not None:
            return self.forward_from_trunk(trunk)
        features, task_rows = self.forward_features(images, tasks)
        return self.forward_heads(features, task_rows)


def _stack_per_task(x: torch.Tensor, selection: TokenSelection, tasks: Sequence[str]
                    ) -> tuple[torch.Tensor, TokenSelection, TaskRows]:
    """One copy of the batch per task, stacked: rows ``[t*B, (t+1)*B)`` are task t's from here on."""
    batch = x.shape[0]
    task_rows = [(task, t * batch, (t + 1) * batch) for t, task in enumerate(tasks)]
    return repeat(x, "b n c -> (t b) n c", t=len(tasks)), selection.repeat(len(tasks)), task_rows


def _no_grad_if(condition: bool) -> contextlib.AbstractContextManager:
    return torch.no_grad() if condition else contextlib.nullcontext()


def _prefix_pattern(value: Any, prefix: str) -> Any:
    """Prefix timm group_matcher patterns (a regex string or a list of (regex, ...) tuples) with ``prefix``.

    The whole pattern is wrapped, ``^prefix(?:...)``: timm's stem pattern is an alternation
    (``^cls_token|reg_token|pos_embed|...``), and prefixing only its first alternative would leave the others
    unmatched (they would fall into the heads' group).
    """
    if isinstance(value, str):
        alternatives = re.sub(r"(^|\|)\^", r"\1", value)  # the anchor moves in front of the prefix
        return f"^{re.escape(prefix)}(?:{alternatives})"
    return [(_prefix_pattern(pattern, prefix), *rest) for pattern, *rest in value]
