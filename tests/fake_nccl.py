"""An NCCL job on a CPU-only host, for tests: ``torch.distributed`` says it is initialised with the ``nccl`` backend in
a world of ``world_size`` processes, and every collective refuses a tensor that is not on a CUDA device, as NCCL
does ("No backend type associated with device type cpu"). Device tensors come from :mod:`fake_cuda`.

    with fake_cuda(), nccl_world(2) as world:
        sum_over_processes(statistics_on_the_device)
    assert world.calls == ["all_reduce"]

The other processes are simulated as identical to this one (same tensors, rank 0 is us): ``all_reduce`` with SUM
multiplies by the world size, ``all_gather`` repeats the tensor, ``broadcast`` keeps it, so callers get the values a
real job of identical processes would. Tensors autograd makes in backward are plain CPU tensors under fake_cuda (its
docstring says why), so a collective called from backward is not device-checked.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence
from unittest import mock

import torch
import torch.distributed as dist


class NcclWorld:
    """The simulated job: its size, and the collectives called in it, in order."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.calls: list[str] = []


def on_device(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cuda"  # a FakeCudaTensor reports cuda:0


def require_device(name: str, tensors: Sequence[torch.Tensor]) -> None:
    """Raise as NCCL does for a CPU tensor (outside backward: see the module docstring)."""
    if torch._C._current_autograd_node() is not None:
        return
    for tensor in tensors:
        if not on_device(tensor):
            raise RuntimeError(f"No backend type associated with device type {tensor.device.type} (fake NCCL: "
                               f"{name} got a tensor of shape {tuple(tensor.shape)} on {tensor.device})")


class _Done:
    """The work handle of an ``async_op=True`` collective (already complete)."""

    def wait(self) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _result(async_op: bool) -> Optional[_Done]:
    return _Done() if async_op else None


@contextlib.contextmanager
def nccl_world(world_size: int = 2) -> Iterator[NcclWorld]:
    """A block in which ``torch.distributed`` is an initialised NCCL job of ``world_size`` identical processes."""
    world = NcclWorld(world_size)
    reduce_sum = (dist.ReduceOp.SUM,)

    def reduced(tensor: torch.Tensor, op: Any) -> torch.Tensor:
        return tensor * world_size if op in reduce_sum else tensor  # MAX, MIN, AVG of identical values: the value

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        world.calls.append("all_reduce")
        require_device("all_reduce", [tensor])
        with torch.no_grad():
            tensor.copy_(reduced(tensor, op))
        return _result(async_op)

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        world.calls.append("all_gather")
        require_device("all_gather", [*tensor_list, tensor])
        with torch.no_grad():
            for part in tensor_list:
                part.copy_(tensor)
        return _result(async_op)

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        world.calls.append("all_gather_into_tensor")
        require_device("all_gather_into_tensor", [output_tensor, input_tensor])
        with torch.no_grad():
            output_tensor.copy_(torch.cat([input_tensor] * world_size).reshape(output_tensor.shape))
        return _result(async_op)

    def broadcast(tensor, src=None, group=None, async_op=False, group_src=None):
        world.calls.append("broadcast")
        require_device("broadcast", [tensor])
        return _result(async_op)

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                          async_op=False):
        world.calls.append("all_to_all_single")
        require_device("all_to_all_single", [output, input])
        with torch.no_grad():  # every process sends us its chunk 0, which is our chunk 0
            chunk = input.split(input_split_sizes or input.shape[0] // world_size)[0]
            output.copy_(torch.cat([chunk] * world_size).reshape(output.shape))
        return _result(async_op)

    def reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        world.calls.append("reduce_scatter")
        require_device("reduce_scatter", [output, *input_list])
        with torch.no_grad():
            output.copy_(reduced(input_list[0], op))
        return _result(async_op)

    def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
        world.calls.append("reduce_scatter_tensor")
        require_device("reduce_scatter_tensor", [output, input])
        with torch.no_grad():
            output.copy_(reduced(input.chunk(world_size)[0], op).reshape(output.shape))
        return _result(async_op)

    replaced = dict(
        is_available=lambda: True, is_initialized=lambda: True, get_backend=lambda group=None: "nccl",
        get_world_size=lambda group=None: world_size, get_rank=lambda group=None: 0,
        barrier=lambda group=None, async_op=False, device_ids=None: _result(async_op),
        all_reduce=all_reduce, all_gather=all_gather, all_gather_into_tensor=all_gather_into_tensor,
        broadcast=broadcast, all_to_all_single=all_to_all_single, reduce_scatter=reduce_scatter,
        reduce_scatter_tensor=reduce_scatter_tensor)
    with contextlib.ExitStack() as patches:
        for name, replacement in replaced.items():
            patches.enter_context(mock.patch.object(dist, name, replacement))
        yield world
