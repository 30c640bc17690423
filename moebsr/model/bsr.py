"""Block selective reprogramming: a declarative plan of which blocks and sub-layers train.

Selection is by block index and sub-layer module, never by substring-matching parameter names (the authors'
code freezes by matching '3', '7', '11' in names, which also catches e.g. 'blocks.1.norm3'-like names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

from .spec import PAPER_MOE_BLOCKS, check_block_indices, scale_block_indices

if TYPE_CHECKING:  # config.py reads this module: it must not import torch
    import torch.nn as nn

BSR_PRESETS = ("paper", "last_k", "all", "none", "custom")
SUBLAYERS = ("attn", "mlp", "router", "norm")


@dataclass
class BSRPlan:
    """Which parts of the backbone are trained; everything else is frozen. Task heads always train."""

    preset: str = "paper"
    """``paper``: blocks (3, 7, 11) scaled to depth; ``last_k``: the last ``last_k`` blocks; ``all``: full fine-tuning
    (embeddings too); ``none``: heads only; ``custom``: ``trainable_blocks``."""
    trainable_blocks: Optional[Sequence[int]] = None
    """Explicit block indices; when given they override the preset's choice."""
    last_k: int = 3
    """Block count for ``last_k``."""
    sublayers: Sequence[str] = field(default_factory=lambda: list(SUBLAYERS))
    """Which parts of a trainable block train: ``attn``, ``mlp`` (experts or dense MLP), ``router`` (MoE gates),
    ``norm``."""
    train_final_norm: Optional[bool] = None
    """Train the final norm (the paper does); ``None``: True except for ``none``."""
    train_embeddings: Optional[bool] = None
    """Train patch/position embeddings and the CLS token; ``None``: True only for ``all``."""
    block_sublayers: Optional[Mapping[int, Sequence[str]]] = None
    """Block -> the sub-layers it trains, for a choice made per block (``moebsr plan`` writes one); these blocks
    train beside the preset's, and only the sub-layers named for them."""

    def validate(self, depth: int) -> None:
        self.resolve(depth)

    def resolve(self, depth: int) -> "ResolvedBSRPlan":
        if self.preset not in BSR_PRESETS:
            raise ValueError(f"bsr.preset: unknown preset {self.preset!r}; accepted: {', '.join(BSR_PRESETS)}")
        unknown = [name for name in self.sublayers if name not in SUBLAYERS]
        if unknown:
            raise ValueError(f"bsr.sublayers: unknown sub-layer(s) {unknown}; accepted: {', '.join(SUBLAYERS)}")
        if self.trainable_blocks is not None:
            blocks = check_block_indices("bsr.trainable_blocks", self.trainable_blocks, depth)
        elif self.preset == "paper":
            blocks = scale_block_indices(PAPER_MOE_BLOCKS, depth)
        elif self.preset == "last_k":
            if isinstance(self.last_k, bool) or not isinstance(self.last_k, int) or not 1 <= self.last_k <= depth:
                raise ValueError(f"bsr.last_k: {self.last_k!r} is invalid; accepted: 1..{depth} (depth {depth})")
            blocks = tuple(range(depth - self.last_k, depth))
        elif self.preset == "all":
            blocks = tuple(range(depth))
        elif self.preset == "none":
            blocks = ()
        else:
            raise ValueError("bsr.trainable_blocks: required with preset 'custom'; accepted: a list of indices")
        final_norm = self.train_final_norm if self.train_final_norm is not None else self.preset != "none"
        embeddings = self.train_embeddings if self.train_embeddings is not None else self.preset == "all"
        per_block = self._resolve_block_sublayers(depth)
        blocks = tuple(sorted(set(blocks) | {index for index, _ in per_block}))
        return ResolvedBSRPlan(blocks, frozenset(self.sublayers), final_norm, embeddings, per_block)

    def _resolve_block_sublayers(self, depth: int) -> tuple[tuple[int, frozenset[str]], ...]:
        if not self.block_sublayers:
            return ()
        indices = check_block_indices("bsr.block_sublayers", list(self.block_sublayers), depth)
        resolved = []
        for index in indices:
            names = list(self.block_sublayers[index])
            unknown = [name for name in names if name not in SUBLAYERS]
            if unknown or not names:
                raise ValueError(f"bsr.block_sublayers.{index}: {names!r} is invalid; accepted: a non-empty list of "
                                 f"{', '.join(SUBLAYERS)}")
            resolved.append((index, frozenset(names)))
        return tuple(sorted(resolved))


@dataclass(frozen=True)
class ResolvedBSRPlan:
    trainable_blocks: tuple[int, ...]
    sublayers: frozenset[str]
    train_final_norm: bool
    train_embeddings: bool
    block_sublayers: tuple[tuple[int, frozenset[str]], ...] = ()

    def sublayers_of(self, block: int) -> frozenset[str]:
        """What trains in ``block`` (empty for a frozen block)."""
        if block not in self.trainable_blocks:
            return frozenset()
        return dict(self.block_sublayers).get(block, self.sublayers)


def as_bsr_plan(plan: "BSRPlan | str | dict | None") -> BSRPlan:
    if plan is None:
        return BSRPlan()
    if isinstance(plan, BSRPlan):
        return plan
    if isinstance(plan, str):
        return BSRPlan(preset=plan)
    return BSRPlan(**plan)


def parameters_of(items: Sequence[nn.Module | nn.Parameter | None]) -> list[nn.Parameter]:
    """The distinct parameters of modules and bare parameters alike that :func:`set_requires_grad` marks: not those a
    module keeps frozen whatever it is told (its ``FROZEN_PARAMETERS``, e.g. low-rank experts' shared weights)."""
    found: dict[int, nn.Parameter] = {}
    kept_frozen: set[int] = set()
    for item in items:
        if item is not None:  # a module has parameters; a bare parameter is one (no torch import here: see above)
            for module in item.modules() if hasattr(item, "modules") else []:
                kept_frozen.update(id(getattr(module, name)) for name in getattr(module, "FROZEN_PARAMETERS", ()))
            for parameter in item.parameters() if hasattr(item, "parameters") else [item]:
                found.setdefault(id(parameter), parameter)
    return [parameter for key, parameter in found.items() if key not in kept_frozen]


def set_requires_grad(items: Sequence[nn.Module | nn.Parameter | None], requires_grad: bool) -> None:
    """``requires_grad_`` on modules and bare parameters alike; ``None`` entries (absent tokens) are skipped."""
    for item in items:
        if item is not None:
            item.requires_grad_(requires_grad)
