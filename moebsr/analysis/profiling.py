"""Measurements of one training step: parameters, FLOPs, bytes saved for backward.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which does not see the fused
``scaled_dot_product_attention`` kernel on CPU, so attention is switched to timm's unfused path while counting
(same arithmetic, every matmul visible).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
from timm.layers import Attention
from timm.models.eva import EvaAttention
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ..model import MoEViT
from ..model.moevit import TrunkState

if TYPE_CHECKING:
    from ..config import RunConfig


@contextlib.contextmanager
def attribute_set(objects: Sequence[Any], name: str, value: Any) -> Iterator[None]:
    """``setattr(obj, name, value)`` on every object meanwhile; the previous values come back afterwards."""
    previous = [getattr(obj, name) for obj in objects]
    for obj in objects:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, old in zip(objects, previous):
            setattr(obj, name, old)


def unfused_attention(model: nn.Module) -> contextlib.AbstractContextManager:
    return attribute_set([m for m in model.modules() if isinstance(m, (Attention, EvaAttention))], "fused_attn", False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


def synthetic_labels(task_outputs: Mapping[str, int], batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random labels in each task's class range (from the task, not its head: a custom head may hide it)."""
    generator = torch.Generator().manual_seed(seed)
    return {task: torch.randint(0, outputs, (batch,), generator=generator) for task, outputs in task_outputs.items()}


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_NAMES = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast a run with ``train.mixed_precision=precision`` trains under (accelerate's choice of dtype)."""
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def training_loss(model: MoEViT, images: torch.Tensor, labels: dict[str, torch.Tensor],
                  aux_weight: float = 0.01, precision: str = "no", trunk: Optional[TrunkState] = None) -> torch.Tensor:
    """The step's loss; with ``trunk`` (the images' frozen-trunk state) the forward starts at the first trainable
    block, as a step whose images all come from the trunk cache does."""
    with autocast(precision, images.device):
        outputs = model(images, list(labels), trunk=trunk)
    loss = sum(F.cross_entropy(outputs[task].float(), target) for task, target in labels.items())
    return loss + aux_weight * model.aux_loss().float()


def training_step_flops(model: MoEViT, images: torch.Tensor, labels: dict[str, torch.Tensor],
                        precision: str = "no", trunk: Optional[TrunkState] = None, keep: bool = True) -> int:
    """FLOPs of forward + backward of one step (the optimizer's elementwise update is not counted). With
    ``keep=False`` the forward's saved tensors are not kept (see :func:`counting_saved_tensors`): the counts are the
    same, shapes decide them, and the pass holds only what the forward keeps alive anyway. Experts recomputed in
    backward (``moe.recompute_experts``) would be recomputed from uninitialised inputs (and routed elsewhere): they
    are counted run once, and their forward's FLOPs added once more, which is what recomputing costs."""
    recomputing = {name: module for name, module in model.named_modules()
                   if getattr(module, "recompute_experts", False)}
    if not keep and recomputing:
        on_path: set[str] = set()  # a mixture recomputes in backward only where its output needs a gradient
        hooks = [module.register_forward_hook(lambda _m, _i, out, name=name: on_path.add(name) if out.requires_grad
                                              else None) for name, module in recomputing.items()]
        try:
            with attribute_set(list(recomputing.values()), "recompute_experts", False):
                once = training_step_flops(model, images, labels, precision, trunk, keep=False)
        finally:
            for hook in hooks:
                hook.remove()
        with unfused_attention(model), FlopCounterMode(display=False) as forward, torch.no_grad():
            training_loss(model, images, labels, precision=precision, trunk=trunk)
        counts = {name: sum(by_op.values()) for name, by_op in forward.get_flop_counts().items()}
        root = type(model).__name__
        return once + sum(counts.get(f"{root}.{name}", 0) - counts.get(f"{root}.{name}.router", 0)
                          for name in on_path)  # the experts' forward: what the checkpoint runs again
    with unfused_attention(model), FlopCounterMode(display=False) as counter:
        with counting_saved_tensors(model, keep=keep):
            loss = training_loss(model, images, labels, precision=precision, trunk=trunk)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def inference_flops(model: MoEViT, images: torch.Tensor, tasks: Union[str, Sequence[str]],
                    precision: str = "no") -> int:
    with unfused_attention(model), FlopCounterMode(display=False) as counter, torch.no_grad(), \
            autocast(precision, images.device):
        model(images, tasks)
    return counter.get_total_flops()


def _first_sight(seen: dict[int, weakref.ref], storage: torch.UntypedStorage,
                 on_free: Optional[Callable[[weakref.ref], None]] = None) -> bool:
    """Whether ``storage`` is new to ``seen``, recording it if so (``on_free`` is called when it is freed). ``seen``
    maps an address to the storage last met there: a freed address may hold another storage later."""
    known = seen.get(storage.data_ptr())
    if known is not None and known() is storage:
        return False
    seen[storage.data_ptr()] = weakref.ref(storage, on_free)
    return True


@contextlib.contextmanager
def counting_saved_tensors(model: nn.Module, keep: bool = True) -> Iterator[dict[int, int]]:
    """Within it, the distinct storages autograd saves for backward, parameters' excluded: ``{n: bytes}``.

    With ``keep=False`` autograd keeps no floating-point storage, only its shape and strides, and backward is handed
    uninitialised tensors of those (integer ones, indices, stay real): enough to count backward's FLOPs, not to
    train. The count is the same (a storage is the same one while some tensor still holds it, as when all are kept),
    and a pass holds what its forward keeps alive, not a training step's saved tensors."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    counted: dict[int, weakref.ref] = {}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> Any:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages and _first_sight(counted, storage):
            seen[len(seen)] = storage.nbytes()
        if keep or not tensor.is_floating_point():
            return tensor
        return tensor.shape, tensor.stride(), tensor.dtype, tensor.device

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        shape, stride, dtype, device = packed
        return torch.empty_strided(shape, stride, dtype=dtype, device=device)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield seen


class LiveTensorBytes(TorchDispatchMode):
    """The most bytes of tensor storage alive at once among those created within it (``peak``): what a pass holds
    beyond what existed before it (weights), counted on any device, CPU included, where no allocator reports it."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._storages: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        size = storage.nbytes()
        if size and _first_sight(self._storages, storage, lambda _ref, size=size: self._freed(size)):
            self.live += size
            self.peak = max(self.peak, self.live)

    def _freed(self, size: int) -> None:
        self.live -= size


def saved_activation_bytes(model: MoEViT, images: torch.Tensor, labels: dict[str, torch.Tensor],
                           precision: str = "no", keep: bool = True) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters excluded), for the whole batch; with
    ``keep=False`` counted without keeping them (a forward only)."""
    with counting_saved_tensors(model, keep=keep) as seen:
        loss = training_loss(model, images, labels, precision=precision)
    if keep:
        loss.backward()
        model.zero_grad(set_to_none=True)
    return sum(seen.values())


# ---- whole-step profile -------------------------------------------------------------------------------------

def _read_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Linux resets the VmHWM high-water mark when "5" is written to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, model: nn.Module) -> int:
    """Bytes the optimizer keeps; before its first step, what it *will* keep (AdamW: 2 fp32 tensors per
    trainable parameter, SGD with momentum: 1)."""
    held = sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if torch.is_tensor(value) and value.dim() > 0)
    if held:
        return held
    per_parameter = 2 if isinstance(optimizer, torch.optim.AdamW) else 1
    return per_parameter * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)


MMAP_THRESHOLD_VARIABLE = "MALLOC_MMAP_THRESHOLD_"


def measure_peak_memory(step_fn: Callable[[], None], device: torch.device, resident_bytes: int) -> tuple[int, str]:
    """Peak memory of one (already warmed-up) training step, model and optimizer state included.

    CUDA: ``max_memory_allocated`` over the step. CPU has no allocator statistics, so: ``resident_bytes``
    (parameters + optimizer state, which exist before the step) plus the rise of the process's peak resident set
    (VmHWM, reset just before) above its resident set at the start of the step. glibc keeps freed memory for reuse
    unless its mmap threshold is fixed, which would hide most of the rise: ``moebsr profile`` runs with
    ``MALLOC_MMAP_THRESHOLD_=65536`` so every buffer of 64 KiB or more is returned to the system when freed.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step_fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    allocator = "mmap64k" if os.environ.get(MMAP_THRESHOLD_VARIABLE) else "default_malloc_may_undercount"
    gc.collect()
    if not _reset_peak_rss():
        return -1, "unavailable"
    before = _read_status_kib("VmRSS") or 0
    step_fn()
    peak = _read_status_kib("VmHWM") or 0
    return resident_bytes + max(0, peak - before) * 1024, f"cpu_params_optimizer_plus_step_rss_rise_{allocator}"


def profile_step(model: MoEViT, task_outputs: Mapping[str, int], batch_size: int,
                 optimizer: torch.optim.Optimizer, steps: int = 5, warmup: int = 2, aux_weight: float = 0.01,
                 peak_only: bool = False, precision: str = "no") -> dict[str, Any]:
    """Everything ``moebsr profile`` reports, for one training step on synthetic images and labels, under the
    autocast of ``precision`` (``train.mixed_precision``): bf16 saves about half the bytes for backward."""
    device = next(model.parameters()).device
    image_size = int(model.backbone.patch_embed.img_size[0])
    in_chans = int(model.backbone.patch_embed.proj.in_channels)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, in_chans, image_size, image_size, generator=generator).to(device)
    tasks = list(task_outputs)
    labels = {t: v.to(device) for t, v in synthetic_labels(task_outputs, batch_size).items()}
    trainable, total = count_parameters(model)

    def step(trunk: Optional[TrunkState] = None) -> None:
        training_loss(model, images, labels, aux_weight, precision, trunk).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if peak_only:
        step()  # lazy initialisation and optimizer state, then the reading
        peak_bytes, peak_source = measure_peak_memory(step, device, parameter_bytes + optimizer_state_bytes(
            optimizer, model))
        return dict(peak_memory_bytes=peak_bytes, peak_memory_source=peak_source)
    timed = timed_calls(step, device, steps, warmup=max(1, warmup))  # warm-up: lazy init, optimizer state
    times, cpu_times = [wall for wall, _ in timed], [cpu for _, cpu in timed]
    infer_times = inference_times(model, images, list(tasks), steps=steps, warmup=warmup, precision=precision)
    state_bytes = optimizer_state_bytes(optimizer, model)
    peak_bytes, peak_source = measure_peak_memory(step, device, parameter_bytes + state_bytes)
    train_flops = training_step_flops(model, images, labels, precision)
    model.eval()
    infer_flops = inference_flops(model, images, list(tasks), precision)
    model.train()
    saved_bytes = saved_activation_bytes(model, images, labels, precision)
    gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    cached = cached_trunk_step(model, images, labels, step, device, steps, warmup, precision)
    return dict(
        tasks=list(tasks), batch_size=batch_size, image_size=image_size, device=str(device), precision=precision,
        trainable_params=trainable, total_params=total,
        train_flops_per_image=train_flops / batch_size, infer_flops_per_image=infer_flops / batch_size,
        saved_activation_bytes_per_image=saved_bytes / batch_size,
        parameter_bytes=parameter_bytes, gradient_bytes=gradient_bytes, optimizer_state_bytes=state_bytes,
        train_memory_bytes=saved_bytes + parameter_bytes + gradient_bytes + state_bytes,
        peak_memory_bytes=peak_bytes, peak_memory_source=peak_source,
        step_time_s=statistics.median(times), step_times_s=times, torch_threads=torch.get_num_threads(),
        step_cpu_time_s=statistics.median(cpu_times),
        infer_images_per_s=batch_size / statistics.median(infer_times),
        tokens_per_block=model.tokens_per_block(),
        **cached,
    )


def cached_trunk_step(model: MoEViT, images: torch.Tensor, labels: dict[str, torch.Tensor],
                      step: Callable[[Optional[TrunkState]], None], device: torch.device, steps: int, warmup: int,
                      precision: str) -> dict[str, Any]:
    """The same step with every image read back from the trunk cache (``trunk_cache.enabled``): the blocks before
    the first trainable one are skipped. Empty when there is no frozen block to cache."""
    first = model.first_grad_block()
    if first <= 0:
        return {}
    with torch.no_grad(), autocast(precision, images.device):
        trunk = model.forward_frozen_trunk(images, list(labels))
    timed = timed_calls(lambda: step(trunk), device, steps, warmup=max(1, warmup))
    return dict(cached_train_flops_per_image=training_step_flops(model, images, labels, precision, trunk)
                / images.shape[0], cached_step_time_s=statistics.median(wall for wall, _ in timed),
                cached_step_cpu_time_s=statistics.median(cpu for _, cpu in timed), cached_from_block=first)


def timed_calls(fn: Callable[[], Any], device: torch.device, steps: int, warmup: int
                ) -> list[tuple[float, float]]:
    """``(wall, CPU)`` seconds of ``steps`` calls of ``fn`` after ``warmup`` untimed ones (CUDA work waited for).

    The CPU time is this process's, all threads: with one thread it is the call's compute, which another job on the
    machine does not inflate as it does the wall clock."""
    times = []
    for index in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= warmup:
            times.append((time.perf_counter() - start, time.process_time() - cpu_start))
    return times


def wall_times(fn: Callable[[], Any], device: torch.device, steps: int, warmup: int) -> list[float]:
    """Wall time of ``steps`` calls of ``fn`` after ``warmup`` untimed ones (CUDA work waited for)."""
    return [wall for wall, _ in timed_calls(fn, device, steps, warmup)]


def inference_times(model: MoEViT, images: torch.Tensor, tasks: Sequence[str], steps: int, warmup: int,
                    precision: str = "no") -> list[float]:
    """Wall time of ``steps`` evaluation forwards (no autograd) after ``warmup`` untimed ones."""
    model.eval()
    with torch.no_grad(), autocast(precision, images.device):
        times = wall_times(lambda: model(images, tasks), images.device, steps, warmup)
    model.train()
    return times


def profile_config(config: "RunConfig", steps: int = 5, warmup: int = 2, device: Optional[str] = None,
                   tasks_per_step: Optional[int] = None, peak_only: bool = False,
                   cpu_peak_command: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Profile one training step of the configured model at the configured batch and image size.

    Needs no data: tasks contribute only their output counts (from the registry), images and labels are
    synthetic, and the backbone is randomly initialised (no download). The step trains the tasks the
    configured sampler would put in one batch: the first joint group for ``joint``, else the first task;
    ``tasks_per_step`` instead puts the first N configured tasks on one shared batch (to measure how the step's
    cost grows with the number of tasks sharing the trunk). On CPU, ``cpu_peak_command`` (the same profile with
    ``--peak-only``) is run in a child process with glibc's mmap threshold fixed, for the peak-memory reading.
    """
    from ..training.build import check_config_against_model, model_from_config
    from ..training.optim import build_optimizer
    from ..training.run_data import RunData, group_by_shared_dataset

    check_config_against_model(config)
    tasks = RunData.from_config(config, check_data=False).tasks  # the run's own tasks, options and checks
    config.model.pretrained, config.model.checkpoint = False, None
    torch.manual_seed(config.train.seed)
    model = model_from_config(config, {name: task.build_head for name, task in tasks.items()})
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(target)
    step_tasks = [config.tasks[0]]
    if tasks_per_step is not None:
        if not 1 <= tasks_per_step <= len(config.tasks):
            raise ValueError(f"--tasks-per-step: {tasks_per_step} is invalid; accepted: 1..{len(config.tasks)}")
        step_tasks = list(config.tasks[:tasks_per_step])
    elif config.train.sampler == "joint":
        step_tasks = group_by_shared_dataset(tasks, config.tasks)[0]
    step_outputs = {name: tasks[name].num_outputs for name in step_tasks}
    report = profile_step(model, step_outputs, config.train.batch_size, build_optimizer(model, config.train),
                          steps=steps, warmup=warmup, aux_weight=config.moe.aux_loss_weight, peak_only=peak_only,
                          precision=config.train.mixed_precision)
    if peak_only:
        return report
    if target.type == "cpu" and cpu_peak_command is not None:
        child = subprocess.run([sys.executable, *cpu_peak_command], capture_output=True, text=True,
                               env={**os.environ, MMAP_THRESHOLD_VARIABLE: "65536"})
        if child.returncode == 0:
            report.update(json.loads(child.stdout.strip().splitlines()[-1]))
    from ..training.recipe import describe_recipe
    report.update(recipe=describe_recipe(config, model, task_outputs={n: t.num_outputs for n, t in tasks.items()}),
                  model=config.model.name, moe_blocks=list(model.moe_blocks),
                  trainable_blocks=list(config.bsr.plan().resolve(model.depth).trainable_blocks),
                  token_drop_blocks=list(model.token_drop_blocks))
    return report


def format_profile(report: dict[str, Any]) -> str:
    gib = 1024 ** 3
    state_bytes = report["parameter_bytes"] + report["gradient_bytes"] + report["optimizer_state_bytes"]
    rows = [
        ("model", f"{report['model']} · batch {report['batch_size']} · {report['image_size']} px · "
                  f"{report['device']} · precision {PRECISION_NAMES[report['precision']]}"),
        ("tasks in the step", ", ".join(report["tasks"])),
        ("blocks: MoE / trained / dropping", f"{report['moe_blocks']} / {report['trainable_blocks']} / "
                                             f"{report['token_drop_blocks']}"),
        ("parameters trainable / total", f"{report['trainable_params']:,} / {report['total_params']:,}"),
        ("training GFLOPs per image", f"{report['train_flops_per_image'] / 1e9:.3f} (forward + backward)"),
        ("inference GFLOPs per image", f"{report['infer_flops_per_image'] / 1e9:.3f}"),
        ("saved for backward per image", f"{report['saved_activation_bytes_per_image'] / 1024 ** 2:.2f} MiB"),
        ("params + grads + optimizer", f"{state_bytes / gib:.3f} GiB"),
        ("training memory (activations+above)", f"{report['train_memory_bytes'] / gib:.3f} GiB"),
        ("peak memory measured", f"{report['peak_memory_bytes'] / gib:.3f} GiB ({report['peak_memory_source']})"),
        ("step time (median)", f"{report['step_time_s'] * 1000:.1f} ms over {len(report['step_times_s'])} steps, "
                               f"{report['torch_threads']} threads"),
        ("step CPU time (median)", f"{report['step_cpu_time_s'] * 1000:.1f} ms (all threads)"),
        *([("with the trunk cache", f"blocks 0-{report['cached_from_block'] - 1} read back: "
                                    f"{report['cached_train_flops_per_image'] / 1e9:.3f} training GFLOPs per image, "
                                    f"step {report['cached_step_time_s'] * 1000:.1f} ms, CPU "
                                    f"{report['cached_step_cpu_time_s'] * 1000:.1f} ms")]
          if "cached_from_block" in report else []),
        ("inference throughput", f"{report['infer_images_per_s']:.1f} images/s (eval, no autograd)"),
        ("tokens per block", " ".join(map(str, report["tokens_per_block"]))),
    ]
    width = max(len(name) for name, _ in rows)
    recipe = ["recipe:", report["recipe"], ""] if "recipe" in report else []
    return "\n".join([*recipe, *(f"{name:<{width}}  {value}" for name, value in rows)])
