"""Task adapters: a low-rank delta per task on a linear layer, applied to that task's rows of a joint batch.

A :class:`TaskLoRALinear` is the linear layer it replaces (same ``weight`` and ``bias``, so state-dict keys and the
BSR plan are unchanged) plus, per task, ``B_t A_t`` scaled by ``alpha / rank``. Which rows of the input belong to
which task is not an argument of ``nn.Linear.forward``: the block halves that contain adapters bind the current
:data:`TaskRows` (:func:`bind_task_rows`), and each adapter adds its task's delta to that task's rows only (one
low-rank product per task on its contiguous rows; exact, and cheap next to the layer itself). A task's adapter
therefore sees, and gets gradients from, its own task's rows and nothing else.

Where adapters go: attention ``qkv``/``proj`` of the chosen blocks, and the dense MLP's ``fc1``/``fc2``. MoE experts
take none: in an MoE block each task already has its own gate over the experts (its per-task capacity), and a
per-task delta on ``fc2`` acts on each expert's own hidden state, so it could not be applied outside the grouped
dispatch, which mixes the tasks' tokens in each expert's chunk; it would need a grouped product per (expert, task)
pair inside every expert's run.
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.eva import EvaAttention

from .errors import UnsupportedModelError
from .moe import TaskRows
from .spec import ADAPTED_MODULES

ADAPTER_MODULES = ADAPTED_MODULES
_TASK_ROWS: ContextVar[Optional[TaskRows]] = ContextVar("moebsr_task_rows", default=None)


@contextlib.contextmanager
def bind_task_rows(task_rows: Optional[TaskRows]) -> Iterator[None]:
    """Task adapters called meanwhile apply each task's delta to ``task_rows``; ``None`` leaves the binding as is.

    Bound where a block half runs, not once per forward: activation checkpointing runs the half again in backward,
    outside the forward, and it must see the same rows there.
    """
    if task_rows is None:
        yield
        return
    token = _TASK_ROWS.set(task_rows)
    try:
        yield
    finally:
        _TASK_ROWS.reset(token)


class TaskLoRALinear(nn.Linear):
    """``nn.Linear`` plus one LoRA delta per task (``lora_A[task]`` ``[rank, in]``, ``lora_B[task]`` ``[out, rank]``,
    B zero-initialised so every task starts from the shared layer)."""

    def __init__(self, base: nn.Linear, tasks: Sequence[str], rank: int, alpha: float) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.weight, self.bias = base.weight, base.bias  # the same parameters (requires_grad, values) as before
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.ParameterDict({t: nn.Parameter(torch.empty(rank, base.in_features, **factory)) for t in tasks})
        self.lora_B = nn.ParameterDict({t: nn.Parameter(torch.zeros(base.out_features, rank, **factory))
                                        for t in tasks})
        for parameter in self.lora_A.values():
            nn.init.kaiming_uniform_(parameter, a=math.sqrt(5))  # PEFT's LoRA initialisation

    @property
    def tasks(self) -> list[str]:
        return list(self.lora_A)

    def delta(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A[task]), self.lora_B[task]) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        task_rows = _TASK_ROWS.get()
        if task_rows is None:
            raise RuntimeError("a task adapter ran with no task rows bound; run it through MoEViT.forward")
        # the model's task rows tile the batch in order (rows [t*B, (t+1)*B) are task t's)
        return out + torch.cat([self.delta(x[start:end], task) for task, start, end in task_rows])

    @torch.no_grad()
    def merged(self, task: str) -> nn.Linear:
        """A plain ``nn.Linear`` computing what this layer computes for ``task``: ``W + scale * B A``."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        update = (self.lora_B[task].double() @ self.lora_A[task].double()) * self.scale
        linear.weight.copy_((self.weight.double() + update).to(self.weight.dtype))
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear


def has_task_parameters(module: nn.Module) -> bool:
    """Whether ``module`` holds a task adapter, so it computes differently per task: the task streams of a joint
    batch must split before it."""
    return any(isinstance(child, TaskLoRALinear) for child in module.modules())


def check_qkv_adaptable(attn: nn.Module, key: str) -> None:
    """Refuse an adapter on an EvaAttention's fused ``qkv`` with q/v biases: timm calls ``F.linear`` on
    ``qkv.weight`` there, not the module, so an adapter in its place would silently never run."""
    if isinstance(attn, EvaAttention) and attn.qkv is not None and attn.q_bias is not None:
        raise UnsupportedModelError(f"{key}: EVA's fused qkv with q/v biases takes no adapter (timm bypasses the "
                                    "module); accepted: modules proj, fc1, fc2 for EVA blocks")


def apply_task_adapters(model: nn.Module, tasks: Sequence[str], blocks: Sequence[int],
                        modules: Sequence[str] = tuple(ADAPTER_MODULES), rank: int = 4, alpha: float = 8.0
                        ) -> list[str]:
    """Put a :class:`TaskLoRALinear` with one adapter per task in place of ``modules`` of ``blocks`` (of a
    ``MoEViT``); returns the adapted layer names. The base weights keep the ``requires_grad`` BSR gave them; the
    adapters train."""
    unknown = [name for name in modules if name not in ADAPTER_MODULES]
    if unknown:
        raise ValueError(f"adapters.modules: unknown module(s) {unknown}; accepted: {', '.join(ADAPTER_MODULES)}")
    if rank < 1:
        raise ValueError(f"adapters.rank: {rank} is invalid; accepted: an integer >= 1")
    adapted = []
    for index in blocks:
        block = model.backbone.blocks[index]
        for name in modules:
            parent_name, _, child = ADAPTER_MODULES[name].rpartition(".")
            parent = block.get_submodule(parent_name)
            layer = getattr(parent, child, None)
            if type(layer) is not nn.Linear:  # fc1/fc2 of an MoE block are stacked experts: no adapter (see above)
                continue
            if name == "qkv":
                check_qkv_adaptable(parent, "adapters.modules")
            setattr(parent, child, TaskLoRALinear(layer, tasks, rank, alpha))
            adapted.append(f"backbone.blocks.{index}.{ADAPTER_MODULES[name]}")
    if not adapted:
        raise ValueError(f"adapters: no linear layer to adapt in blocks {list(blocks)} for modules {list(modules)} "
                         "(MoE experts take no adapter); accepted: blocks with attention or a dense MLP")
    return adapted


def merge_task_adapters(model: nn.Module, task: str) -> list[str]:
    """Replace every task adapter by the plain linear layer it is for ``task``; returns the merged layer names."""
    merged = []
    for name, module in list(model.named_modules()):
        if isinstance(module, TaskLoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.merged(task))
            merged.append(name)
    return merged
