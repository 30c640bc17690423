"""Declarative specs for the MoE-ViT: which blocks become MoE, where tokens are dropped, and their checks.

Block indices in the paper are given for a 12-block ViT (MoE at 3, 7, 11; token dropping at 3, 6, 9). A spec
left at ``None`` takes those indices scaled to the backbone's depth, so the same config works on a 4-block
test model and on DeiT-S.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

PAPER_DEPTH = 12
PAPER_MOE_BLOCKS = (3, 7, 11)
PAPER_TOKEN_DROP_BLOCKS = (3, 6, 9)
ROUTER_MODES = ("task", "shared")
MOE_BACKENDS = ("torch", "tutel")
MOE_DISPATCHES = ("grouped", "padded")  # the torch backend's (moe.py); tutel always dispatches padded
# Names a config may give, kept here (no torch) so that moebsr.config validates them without importing the model
TOKEN_DROP_DECISIONS = ("shared", "per_task")  # token_drop.decision
FROZEN_DTYPE_NAMES = ("fp32", "bf16", "fp16")  # bsr.frozen_dtype: precision.FROZEN_DTYPES maps them to dtypes
ADAPTED_MODULES = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}  # lora/adapters.modules


def scale_block_indices(indices: Sequence[int], depth: int, reference_depth: int = PAPER_DEPTH) -> tuple[int, ...]:
    """Map block indices chosen for a ``reference_depth`` network onto one with ``depth`` blocks.

    Index i covers the (i+1)-th twelfth of the network; it maps to the block ending closest to the same
    fraction of the new depth, so (3, 7, 11) stays (3, 7, 11) at depth 12 and becomes (1, 3, 5) at depth 6.
    """
    scaled = {max(0, min(depth - 1, round((index + 1) * depth / reference_depth) - 1)) for index in indices}
    return tuple(sorted(scaled))


def check_block_indices(key: str, indices: Sequence[int], depth: int) -> tuple[int, ...]:
    """Return the indices as a sorted tuple, or raise naming the key, the bad index and the valid range."""
    checked = []
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"{key}: block index {index!r} is not an integer; accepted: integers 0..{depth - 1}")
        if not 0 <= index < depth:
            raise ValueError(f"{key}: block index {index} out of range; accepted: 0..{depth - 1} (depth {depth})")
        checked.append(index)
    if len(set(checked)) != len(checked):
        raise ValueError(f"{key}: duplicate block indices in {list(indices)}")
    return tuple(sorted(checked))


@dataclass
class MoESpec:
    """Where and how the dense MLPs become mixtures of experts (each field's docstring says what it does)."""

    blocks: Optional[List[int]] = None  # List, not Sequence: the config subclasses this for OmegaConf
    """Blocks whose MLP becomes MoE; ``null``: the paper's (3, 7, 11) scaled to depth; ``[]``: none."""
    num_experts: int = 16
    """Experts per MoE layer, >= 1, each upcycled as a copy of the dense MLP."""
    top_k: int = 4
    """Experts each token is sent to, 1..num_experts."""
    hidden_features: Optional[int] = None
    """Expert hidden width; ``null``: the dense MLP's, which allows exact upcycling."""
    router: str = "task"
    """``task``: one gate per task (M³ViT multi-gate); ``shared``: one gate for all tasks."""
    task_router_blocks: Optional[List[int]] = None
    """With ``router: task``, the MoE blocks that route per task (the others share one gate); ``null``: every MoE
    block. The task streams of a joint batch split at the first per-task block, so per-task routing in the last MoE
    block only keeps the trunk shared up to there (T tasks on one image batch then cost little more than one)."""
    renormalize: bool = True
    """Rescale the top-k gate weights to sum to 1, so an upcycled MoE layer equals the dense MLP at step 0; false
    uses the raw softmax probabilities (the paper's choice)."""
    capacity_factor: Optional[float] = None
    """Cap on tokens per expert, ``top_k * floor(factor * ceil(tokens / num_experts))`` slots (tutel's formula, both
    backends), > 0; assignments over the cap are dropped first-choice-first (GShard order); ``null``: dropless."""
    backend: str = "torch"
    """``torch`` (built in) or ``tutel`` (optional install; shards the experts across processes)."""
    dispatch: str = "grouped"
    """How the torch backend runs the experts: ``grouped``: each expert on exactly its tokens, their counts read back
    from the device once per MoE layer; ``padded``: every expert on its full capacity (needs ``capacity_factor``;
    empty slots cost FLOPs), with no read from the device."""
    recompute_experts: bool = False
    """Keep only each MoE layer's input, routing and gate weights for backward and run the experts again there
    (activation checkpointing of the expert MLPs; torch backend): the top-k expert hidden states (``top_k x hidden``
    per token) are not stored, backward costs one more expert forward, and results are identical."""
    collapse_frozen: bool = False
    """Run an MoE layer whose experts and router are all frozen as the one dense MLP its upcycled experts copy
    (``model/frozen_experts.py``): the same outputs at 1/num_experts of its weights. Needs ``hidden_features: null``,
    renormalised gates, no capacity cap and the torch backend."""
    expert_rank: Optional[int] = None
    """``null``: every expert a whole copy of the dense MLP; ``r`` >= 1: the experts share that MLP's weights, frozen,
    and each trains a rank-``r`` delta of ``fc1`` and ``fc2`` plus its own biases (MoLoRA-style,
    ``model/low_rank_experts.py``): an MoE block's trainable experts hold ``2 r (dim + hidden)`` weights each instead
    of ``2 dim hidden``. Needs ``hidden_features: null``, a ``timm.layers.Mlp`` and the torch backend."""

    def resolve_blocks(self, depth: int) -> tuple[int, ...]:
        if self.blocks is None:
            return scale_block_indices(PAPER_MOE_BLOCKS, depth)
        return check_block_indices("moe.blocks", self.blocks, depth)

    def router_mode(self, block: int) -> str:
        """``task`` or ``shared``: how MoE block ``block`` routes."""
        if self.router != "task" or self.task_router_blocks is None:
            return self.router
        return "task" if block in self.task_router_blocks else "shared"

    def validate(self, depth: int) -> None:
        blocks = self.resolve_blocks(depth)
        if self.num_experts < 1:
            raise ValueError(f"moe.num_experts: {self.num_experts} is invalid; accepted: an integer >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"moe.top_k: {self.top_k} is invalid; accepted: 1..moe.num_experts ({self.num_experts})")
        if self.hidden_features is not None and self.hidden_features < 1:
            raise ValueError(f"moe.hidden_features: {self.hidden_features} is invalid; accepted: >= 1 or null")
        if self.router not in ROUTER_MODES:
            raise ValueError(f"moe.router: unknown mode {self.router!r}; accepted: {', '.join(ROUTER_MODES)}")
        if self.task_router_blocks is not None:
            if self.router != "task":
                raise ValueError(f"moe.task_router_blocks: {list(self.task_router_blocks)} does nothing with "
                                 f"moe.router={self.router}; accepted: moe.router=task, or moe.task_router_blocks=null")
            chosen = check_block_indices("moe.task_router_blocks", self.task_router_blocks, depth)
            outside = [index for index in chosen if index not in blocks]
            if outside or not chosen:
                problem = f"{outside} are not MoE blocks" if outside else "[] is empty"
                raise ValueError(f"moe.task_router_blocks: {problem}; accepted: a non-empty subset of the MoE blocks "
                                 f"{list(blocks)}, or null")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"moe.capacity_factor: {self.capacity_factor} is invalid; accepted: > 0 or null")
        if self.backend not in MOE_BACKENDS:
            raise ValueError(f"moe.backend: unknown backend {self.backend!r}; accepted: {', '.join(MOE_BACKENDS)}")
        check_dispatch(self.dispatch, self.capacity_factor)
        if self.dispatch == "padded" and self.backend != "torch":
            raise ValueError(f"moe.dispatch: 'padded' is the torch backend's (moe.backend is {self.backend!r}, which "
                             "always pads); accepted: moe.backend=torch, or moe.dispatch=grouped")
        if self.recompute_experts and self.backend != "torch":
            raise ValueError(f"moe.recompute_experts: only the torch backend recomputes experts (moe.backend is "
                             f"{self.backend!r}); accepted: moe.backend=torch, or moe.recompute_experts=false")
        if self.expert_rank is not None:
            if isinstance(self.expert_rank, bool) or not isinstance(self.expert_rank, int) or self.expert_rank < 1:
                raise ValueError(f"moe.expert_rank: {self.expert_rank!r} is invalid; accepted: an integer >= 1 or null")
            for bad, setting, accepted in ((self.hidden_features is not None,
                                            f"moe.hidden_features={self.hidden_features}", "null"),
                                           (self.backend != "torch", f"moe.backend={self.backend}", "torch")):
                if bad:
                    raise ValueError(f"moe.expert_rank: low-rank experts are deltas of the dense MLP on the torch "
                                     f"backend, so {setting} cannot be; accepted: {setting.split('=')[0]}={accepted}, "
                                     "or moe.expert_rank=null")
        if self.collapse_frozen:
            self._check_collapsible()
        if self.backend == "tutel":
            from .tutel_install import require_tutel
            require_tutel()

    def _check_collapsible(self) -> None:
        """A frozen layer equals its dense MLP only with exact copies, gates summing to 1 and every token served."""
        problems = [(self.hidden_features is not None, f"moe.hidden_features={self.hidden_features}", "null"),
                    (not self.renormalize, "moe.renormalize=false", "true"),
                    (self.capacity_factor is not None, f"moe.capacity_factor={self.capacity_factor}", "null"),
                    (self.backend != "torch", f"moe.backend={self.backend}", "torch")]
        for bad, setting, accepted in problems:
            if bad:
                raise ValueError(f"moe.collapse_frozen: a frozen MoE layer equals its dense MLP only without "
                                 f"{setting}; accepted: {setting.split('=')[0]}={accepted}, or "
                                 "moe.collapse_frozen=false")


def check_dispatch(dispatch: str, capacity_factor: Optional[float]) -> str:
    """``moe.dispatch``, or a one-line error: padded needs a capacity, which alone fixes the slots per expert."""
    if dispatch not in MOE_DISPATCHES:
        raise ValueError(f"moe.dispatch: {dispatch!r} is invalid; accepted: {', '.join(MOE_DISPATCHES)}")
    if dispatch == "padded" and capacity_factor is None:
        raise ValueError("moe.dispatch: 'padded' needs moe.capacity_factor (the slots per expert); accepted: a "
                         "moe.capacity_factor > 0, or moe.dispatch=grouped")
    return dispatch


@dataclass
class TokenDropSpec:
    """EViT-style token dropping by the CLS attention of the block, between its attention and its MLP."""

    blocks: Optional[List[int]] = None
    """Blocks that drop tokens; ``null``: the paper's (3, 6, 9) scaled to depth; ``[]``: none."""
    keep_rate: float = 0.5
    """Fraction of patch tokens kept at each dropping block, in (0, 1]; ``ceil(keep_rate * (N - 1))`` survive."""
    fuse: bool = True
    """Fold the dropped tokens into one extra token, their CLS-attention-weighted sum (EViT); false discards them."""
    decision: str = "shared"
    """``shared``: one ranking per image, made by the CLS attention of the last block all tasks share, decides every
    later stage, so an image keeps the same tokens for every task; ``per_task``: after the per-task split each stage
    ranks by its own task's attention."""

    def resolve_blocks(self, depth: int) -> tuple[int, ...]:
        if self.blocks is None:
            return scale_block_indices(PAPER_TOKEN_DROP_BLOCKS, depth)
        return check_block_indices("token_drop.blocks", self.blocks, depth)

    def validate(self, depth: int) -> None:
        self.resolve_blocks(depth)
        check_keep_rate(self.keep_rate)
        check_decision(self.decision)


def check_decision(decision: str) -> str:
    if decision not in TOKEN_DROP_DECISIONS:
        raise ValueError(f"token_drop.decision: {decision!r} is invalid; accepted: {', '.join(TOKEN_DROP_DECISIONS)}")
    return decision


def check_keep_rate(keep_rate: float, key: str = "token_drop.keep_rate") -> float:
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"{key}: {keep_rate!r} is invalid; accepted: a number in (0, 1]")
    return float(keep_rate)
