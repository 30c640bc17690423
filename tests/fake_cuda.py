"""A CUDA device on a CPU-only host, for tests: tensors that report ``cuda:0``, hold CPU data, refuse what CUDA refuses
(a CPU tensor of dim > 0 meeting a device tensor) and count every read back to the host.

    with fake_cuda() as cuda:
        model.to("cuda")                      # parameters become FakeCudaTensor
        loss = model(torch.randn(4, 3, 32, 32).to("cuda")).sum()
        loss.backward()
    assert cuda.host_reads.total() == 0, cuda.host_reads

Why a ``__torch_function__`` subclass and not a ``__torch_dispatch__`` wrapper (``_make_wrapper_subclass``): autograd
records the device of every tensor it sees, and on a CPU-only build of torch a wrapper that reports CUDA aborts the
process as soon as a parameter that reports CUDA requires grad (``InputMetadata``: "PyTorch is not linked with
support for cuda devices"); with a fake CUDA guard compiled in, ``InputBuffer::add`` then needs a CUDA accelerator hook.
A ``__torch_function__`` subclass keeps autograd on the real CPU tensors underneath and sees every call from Python:
``.device`` answers ``cuda:0``, calls that mix devices raise as CUDA's do, and ``.item()``, ``.tolist()``, ``.cpu()``,
``bool()``... are counted. What it cannot see: tensors autograd makes itself in backward (gradients are plain CPU
tensors until read through ``.grad``), and C++ inside torch's own kernels (those are device-safe). Code that calls
``torch.cuda`` itself cannot run here (``torch.cuda.synchronize``, activation checkpointing saving the CUDA RNG state,
tutel's CUDA kernels): that is for the gpu-marked tests on a GPU.

The rules follow CUDA's: a CPU tensor of dim 0 may meet device tensors in elementwise ops (a "CPU scalar") but not in
``cat``/``stack``/matmuls/gathers; CPU index tensors may index a device tensor (CUDA copies them over); copies between
devices are allowed (device to host is a host read). Host reads counted (``FakeCuda.host_reads``, by kind): scalar
reads (``.item()``, ``bool()``, ``float()``, ... and every implicit scalar conversion: ``aten._local_scalar_dense``),
``.tolist()``, ``.numpy()``, copies to the CPU, and the ops whose output size CUDA must read back (``nonzero``,
``unique``, ``masked_select``, ``bincount``, ``equal``, ``repeat_interleave`` without ``output_size``, indexing with a
device boolean mask).
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

FAKE_CUDA = torch.device("cuda", 0)

# calls that take a CPU dim-0 tensor beside device tensors only on the CPU: not elementwise (no "CPU scalar" rule)
NO_CPU_SCALARS = {"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack", "matmul", "mm", "bmm",
                  "baddbmm", "addmm", "linear", "index_select", "index_add", "index_add_", "index_copy", "index_copy_",
                  "gather", "scatter", "scatter_", "scatter_add", "scatter_add_", "take_along_dim", "embedding"}
INDEXING = {"__getitem__", "__setitem__", "index_put", "index_put_"}  # CPU index tensors are copied to the device
# the other tensor's size or type only, or a cross-device copy
SHAPE_ONLY = {"expand_as", "view_as", "reshape_as", "copy_", "module_load", "_has_compatible_shallow_copy_type",
              "is_same_size"}
HOST_COPIES = {"tolist": "tolist", "numpy": "numpy", "__array__": "numpy", "__repr__": "print", "__format__": "print"}
# aten ops whose result CUDA only knows after a read back to the host (the ones a training step might meet)
SYNCING_OPS = {"_local_scalar_dense", "equal", "nonzero", "masked_select", "_unique2", "unique_dim",
               "unique_consecutive", "bincount"}


class FakeCuda:
    """What a :func:`fake_cuda` block saw: host reads by kind, and copies to the device: all, asynchronous from pinned
    memory, and synchronous (``non_blocking=False``: CUDA copies, then waits for everything queued on the stream)."""

    def __init__(self) -> None:
        self.host_reads: collections.Counter[str] = collections.Counter()
        self.copies_to_device = 0
        self.pinned_copies_to_device = 0  # non_blocking copies from memory pin_memory() returned: asynchronous
        self.synchronous_copies_to_device = 0  # non_blocking=False: CUDA waits for the stream (a host sync)
        self.pinned: set[int] = set()

    def read(self, kind: str) -> None:
        self.host_reads[kind] += 1


_ACTIVE: list[FakeCuda] = []


def _record(kind: str) -> None:
    for recorder in _ACTIVE:
        recorder.read(kind)


def _name(func: Callable) -> str:
    name = getattr(func, "__name__", str(func))
    if name == "__get__" or name == "__set__":  # a property: Tensor.device.__get__ -> "device"
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _is_cuda(device: Any) -> bool:
    if device is None or isinstance(device, bool):
        return False
    if isinstance(device, int):  # an ordinal means a CUDA device
        return True
    return torch.device(device).type == "cuda"


class FakeCudaTensor(torch.Tensor):
    """A CPU tensor that reports ``cuda:0`` and refuses to meet CPU tensors as a CUDA tensor would."""

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        name = _name(func)
        if name == "device" and len(args) == 1:
            return FAKE_CUDA
        if name == "is_cuda" and len(args) == 1:
            return True
        if name == "is_cpu" and len(args) == 1:
            return False
        if name == "get_device":
            return 0
        if name == "data" and getattr(func, "__name__", "") == "__set__":
            return _set_data(*args)
        if name in ("cpu", "to", "cuda", "pin_memory", "is_pinned", "copy_"):
            handled = _move(name, args, kwargs)
            if handled is not NotImplemented:
                return handled
        check_devices(name, args, kwargs)
        if name in HOST_COPIES:
            _record(HOST_COPIES[name])
            with torch._C.DisableTorchFunctionSubclass():
                return func(*tree_map(_plain, args), **tree_map(_plain, kwargs))
        device = kwargs.get("device")
        if device is not None and not _is_cuda(device):  # e.g. zeros_like(x, device="cpu"): a CPU result
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if device is not None:
            kwargs = dict(kwargs, device="cpu")
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        return _wrap_all(out)


class FakeCudaParameter(FakeCudaTensor, torch.nn.Parameter):
    """A parameter moved to the fake device in place, as ``module.to("cuda")`` moves one (``param.data = moved``): the
    same object, with its attributes and hooks."""


def _set_data(tensor: torch.Tensor, data: torch.Tensor) -> None:
    """``tensor.data = data``; a CPU tensor given device data becomes a device tensor, in place."""
    with torch._C.DisableTorchFunctionSubclass():
        tensor.data = _plain(data)
    if isinstance(data, FakeCudaTensor) and not isinstance(tensor, FakeCudaTensor):
        tensor.__class__ = FakeCudaParameter if isinstance(tensor, torch.nn.Parameter) else FakeCudaTensor
    elif not isinstance(data, FakeCudaTensor) and isinstance(tensor, FakeCudaTensor):
        tensor.__class__ = torch.nn.Parameter if isinstance(tensor, FakeCudaParameter) else torch.Tensor


def _plain(value: Any) -> Any:
    return value.as_subclass(torch.Tensor) if isinstance(value, FakeCudaTensor) else value


def _wrap(value: Any) -> Any:
    """Results of a call on device tensors live on the device (a result that already is one, e.g. ``self`` of an
    in-place op, is returned as it is)."""
    if isinstance(value, torch.Tensor) and not isinstance(value, FakeCudaTensor):
        return value.as_subclass(FakeCudaTensor)
    return value


def _wrap_all(out: Any) -> Any:
    """:func:`_wrap` through lists, tuples and dicts of results; a ``torch.Size`` stays one."""
    return tree_map(_wrap, out, is_leaf=lambda value: isinstance(value, torch.Size))


def check_devices(name: str, args: tuple, kwargs: dict) -> None:
    """Raise as CUDA would when a call mixes a device tensor with a CPU tensor it cannot take."""
    tensors = [value for value in tree_flatten((args, kwargs))[0] if isinstance(value, torch.Tensor)]
    if not any(isinstance(t, FakeCudaTensor) for t in tensors):
        return
    if name in SHAPE_ONLY:
        return
    if name in INDEXING:
        if not isinstance(args[0], FakeCudaTensor) and args[0].dim() > 0:
            _refuse(name, "a device index into a CPU tensor")
        return
    for tensor in tensors:
        if isinstance(tensor, FakeCudaTensor) or tensor.device.type != "cpu":
            continue
        if tensor.dim() == 0 and name not in NO_CPU_SCALARS:
            continue  # a CPU scalar in an elementwise op, as CUDA allows
        _refuse(name, f"a CPU tensor of shape {tuple(tensor.shape)}")


def _refuse(name: str, what: str) -> None:
    raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, cuda:0 and "
                       f"cpu! (fake CUDA: {name} got {what})")


def _move(name: str, args: tuple, kwargs: dict) -> Any:
    """``.to``/``.cuda``/``.cpu``/``.pin_memory``/``copy_`` of any tensor inside :func:`fake_cuda`, or
    NotImplemented for a call that moves nothing (e.g. ``.to(torch.float16)``)."""
    tensor = args[0]
    on_device = isinstance(tensor, FakeCudaTensor)
    recorder = _ACTIVE[-1] if _ACTIVE else None
    if name == "is_pinned":
        return not on_device and recorder is not None and tensor.data_ptr() in recorder.pinned
    if name == "pin_memory":
        if on_device:
            raise RuntimeError("cannot pin 'torch.cuda.FloatTensor' only dense CPU tensors can be pinned (fake CUDA)")
        pinned = tensor.clone()
        if recorder is not None:
            recorder.pinned.add(pinned.data_ptr())
        return pinned
    if name == "copy_":
        destination, source = args[0], args[1]
        if isinstance(source, FakeCudaTensor) and not isinstance(destination, FakeCudaTensor):
            _record("copy_to_cpu")
        elif isinstance(destination, FakeCudaTensor) and not isinstance(source, FakeCudaTensor):
            _count_copy_to_device(source, kwargs.get("non_blocking", False) or (len(args) > 2 and args[2]))
        with torch._C.DisableTorchFunctionSubclass():
            destination.copy_(_plain(source), *args[2:], **kwargs)
        return destination
    if name == "cpu":
        target, dtype, non_blocking = torch.device("cpu"), None, False
    elif name == "cuda":
        target, dtype, non_blocking = FAKE_CUDA, None, bool(kwargs.get("non_blocking", False))
    else:
        if len(args) > 1 and isinstance(args[1], torch.Tensor):  # .to(other): other's device and dtype
            target, dtype, non_blocking = args[1].device, args[1].dtype, bool(kwargs.get("non_blocking", False))
        else:
            target, dtype, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
    if target is None or _is_cuda(target) == on_device:  # stays where it is: maybe a dtype change
        if not on_device:
            return NotImplemented
        if dtype is None or dtype == tensor.dtype:
            return tensor
        with torch._C.DisableTorchFunctionSubclass():
            return tensor.to(dtype).as_subclass(FakeCudaTensor)
    with torch._C.DisableTorchFunctionSubclass():
        data = tensor.as_subclass(torch.Tensor) if on_device else tensor
        moved = data.to(dtype=dtype or data.dtype, copy=True)
    if on_device:
        _record("copy_to_cpu")
        return moved
    _count_copy_to_device(tensor, non_blocking)
    return moved.as_subclass(FakeCudaTensor)


def _count_copy_to_device(source: torch.Tensor, non_blocking: bool) -> None:
    for recorder in _ACTIVE:
        recorder.copies_to_device += 1
        if non_blocking and source.data_ptr() in recorder.pinned:
            recorder.pinned_copies_to_device += 1
        if not non_blocking:
            recorder.synchronous_copies_to_device += 1


class _FactoryMode(TorchFunctionMode):
    """Calls with no device tensor among their arguments: factories given ``device="cuda"`` make device tensors, and
    ``.to``/``.cuda``/``.pin_memory`` of CPU tensors move or pin them."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        name = _name(func)
        if name == "data" and getattr(func, "__name__", "") == "__set__":  # torch asks only the tensor set, not data
            return _set_data(*args)
        if any(isinstance(value, FakeCudaTensor) for value in tree_flatten((args, kwargs))[0]):
            return func(*args, **kwargs)  # the subclass's rules
        if name in ("to", "cuda", "pin_memory", "is_pinned") and args and isinstance(args[0], torch.Tensor):
            handled = _move(name, args, kwargs)
            if handled is not NotImplemented:
                return handled
        if _is_cuda(kwargs.get("device")):
            return _wrap_all(func(*args, **dict(kwargs, device="cpu")))
        return func(*args, **kwargs)


class _SyncingOps(TorchDispatchMode):
    """Counts aten ops on device tensors that CUDA can only finish with a read back to the host, including the scalar
    reads torch's C++ makes for ``bool()``, ``.item()`` or a tensor passed where a number is expected."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS or name == "repeat_interleave" and kwargs.get("output_size") is None:
            if any(isinstance(value, FakeCudaTensor) for value in tree_flatten((args, kwargs))[0]):
                _record("item" if name == "_local_scalar_dense" else name)
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1:
            masks = [index for index in args[1] if isinstance(index, FakeCudaTensor)
                     and index.dtype in (torch.bool, torch.uint8)]
            if masks:
                _record("boolean_mask_index")  # nonzero on the device, then its size read back
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeCuda]:
    """A block in which ``device="cuda"`` means a fake CUDA device (see the module docstring); ``module.to("cuda")``
    moves parameters in place, as it does on a GPU."""
    recorder = FakeCuda()
    _ACTIVE.append(recorder)
    try:
        with _FactoryMode(), _SyncingOps():
            yield recorder
    finally:
        _ACTIVE.remove(recorder)
