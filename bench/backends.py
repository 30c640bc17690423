"""torch vs tutel MoE backend, side by side in one run: one process, then P processes (DDP vs expert parallel).

    python bench/backends.py                                  # quickstart model, CPU, 1 and 2 processes
    python bench/backends.py --size deit_s --batch-size 8     # DeiT-S, the paper's MoE (16 experts, top-4)
    python bench/backends.py --size vit_b --batch-size 64 --processes 8 --device cuda   # multi-GPU

One process: ``moebsr profile --json`` for each backend (step time, FLOPs, peak memory), in rotation.
P processes (``torchrun``, gloo on CPU / NCCL on GPU), same global batch: the torch backend replicates every expert
in every process and all-reduces their gradients (DDP); tutel keeps E/P experts per process and moves tokens
all-to-all. Reported per process: parameter and optimizer-state bytes (what expert parallelism saves), step time.
Both use the paper's recipe (MoE and BSR at 3/7/11, dropping at 3/6/9, 16 experts, top-4), scaled to depth.
Needs tutel installed (see docs/expert-parallel.md). Writes ``<out>/backends_<size>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from compare import profile
from recipes import BASE_CONFIG, COMMON, RECIPES, REPO, SIZES

if TYPE_CHECKING:
    import torch

BACKENDS = ("torch", "tutel")


def overrides(args: argparse.Namespace, backend: str) -> list[str]:
    return [*SIZES[args.size], *COMMON, *RECIPES["paper_bsr"], "model.checkpoint=null",
            f"train.batch_size={args.batch_size}", "train.sampler=round_robin", f"moe.backend={backend}"]


def in_rotation(measure: Callable[[str], dict], repeats: int) -> dict[str, dict]:
    """``measure(backend)`` for torch, tutel, torch, tutel, ... (a slow spell of the machine hits both alike);
    each backend's last report, with its median step time over the repeats."""
    runs: dict[str, list[dict]] = {backend: [] for backend in BACKENDS}
    for _ in range(repeats):
        for backend in BACKENDS:
            runs[backend].append(measure(backend))
    return {backend: dict(reports[-1], step_time_s=statistics.median(r["step_time_s"] for r in reports))
            for backend, reports in runs.items()}


def one_process(args: argparse.Namespace) -> dict[str, dict]:
    return in_rotation(lambda backend: profile(overrides(args, backend), args), args.repeats)


def worker(args: argparse.Namespace) -> None:
    """One process of the P-process measurement (started by torchrun)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from moebsr.analysis.profiling import optimizer_state_bytes, synthetic_labels, training_loss
    from moebsr.config import load_config
    from moebsr.training.build import model_from_config
    from moebsr.training.expert_parallel import exclude_sharded_from_ddp
    from moebsr.training.optim import build_optimizer
    from moebsr.training.run_data import RunData
    from moebsr.training.runner import clean_exit

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    config = load_config(BASE_CONFIG, overrides(args, args.backend))
    tasks = RunData.from_config(config, check_data=False).tasks
    task = config.tasks[0]
    torch.manual_seed(config.train.seed)
    model = model_from_config(config, {name: t.build_head for name, t in tasks.items()}).to(device)
    sharded = exclude_sharded_from_ddp(model)
    network = DistributedDataParallel(model, find_unused_parameters=True, device_ids=[device] if cuda else None)
    optimizer = build_optimizer(model, config.train)
    local_batch = args.batch_size // world
    size = int(model.backbone.patch_embed.img_size[0])
    generator = torch.Generator().manual_seed(rank)
    images = torch.randn(local_batch, 3, size, size, generator=generator).to(device)
    labels = {task: synthetic_labels({task: tasks[task].num_outputs}, local_batch, seed=rank)[task].to(device)}

    class Wrapped(torch.nn.Module):  # training_loss wants the model's aux_loss next to the DDP forward
        def forward(self, *a):
            return network(*a)

        def aux_loss(self):
            return model.aux_loss()

    times = []
    for index in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        training_loss(Wrapped(), images, labels, config.moe.aux_loss_weight).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        elapsed = slowest_process_seconds(time.perf_counter() - start, device)
        if index >= args.warmup:
            times.append(elapsed)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    report = dict(backend=args.backend, processes=world, global_batch=local_batch * world,
                  step_time_s=statistics.median(times), parameter_bytes_per_process=parameter_bytes,
                  optimizer_state_bytes_per_process=optimizer_state_bytes(optimizer, model),
                  sharded_expert_tensors=len(sharded),
                  peak_cuda_bytes=torch.cuda.max_memory_allocated(device) if cuda else None)
    if rank == 0:
        print(json.dumps(report))
    clean_exit(0)


def slowest_process_seconds(seconds: float, device: "torch.device") -> float:
    """The longest of every process's ``seconds`` (a step lasts as long as its slowest process), reduced in a tensor
    on the backend's device: NCCL reduces only CUDA tensors."""
    import torch
    import torch.distributed as dist

    elapsed = torch.tensor([seconds], device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def many_processes(args: argparse.Namespace) -> dict[str, dict]:
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))

    def measure(backend: str) -> dict:
        command = [str(torchrun), "--standalone", "--nproc_per_node", str(args.processes), __file__, "--worker",
                   "--backend", backend, *sys.argv[1:]]
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        if result.returncode != 0:
            raise SystemExit(f"{backend} with {args.processes} processes failed:\n{result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])
    return in_rotation(measure, args.repeats)


def table(single: dict[str, dict], multi: dict[str, dict], args: argparse.Namespace) -> str:
    mib = 1024 ** 2
    torch1, tutel1, torchp, tutelp = single["torch"], single["tutel"], multi["torch"], multi["tutel"]
    p = args.processes
    rows = [
        ("1 process: step time", f"{torch1['step_time_s'] * 1e3:.1f} ms", f"{tutel1['step_time_s'] * 1e3:.1f} ms",
         tutel1["step_time_s"] / torch1["step_time_s"]),
        ("1 process: training GFLOPs / image", f"{torch1['train_flops_per_image'] / 1e9:.3f}",
         f"{tutel1['train_flops_per_image'] / 1e9:.3f}",
         tutel1["train_flops_per_image"] / torch1["train_flops_per_image"]),
        ("1 process: peak memory", f"{torch1['peak_memory_bytes'] / mib:.0f} MiB",
         f"{tutel1['peak_memory_bytes'] / mib:.0f} MiB", tutel1["peak_memory_bytes"] / torch1["peak_memory_bytes"]),
        (f"{p} processes: step time", f"{torchp['step_time_s'] * 1e3:.1f} ms", f"{tutelp['step_time_s'] * 1e3:.1f} ms",
         tutelp["step_time_s"] / torchp["step_time_s"]),
        (f"{p} processes: parameters / process", f"{torchp['parameter_bytes_per_process'] / mib:.1f} MiB",
         f"{tutelp['parameter_bytes_per_process'] / mib:.1f} MiB",
         tutelp["parameter_bytes_per_process"] / torchp["parameter_bytes_per_process"]),
        (f"{p} processes: optimizer state / process", f"{torchp['optimizer_state_bytes_per_process'] / mib:.1f} MiB",
         f"{tutelp['optimizer_state_bytes_per_process'] / mib:.1f} MiB",
         tutelp["optimizer_state_bytes_per_process"] / torchp["optimizer_state_bytes_per_process"]),
    ]
    if torchp.get("peak_cuda_bytes"):
        rows.append((f"{p} processes: peak CUDA memory", f"{torchp['peak_cuda_bytes'] / mib:.0f} MiB",
                     f"{tutelp['peak_cuda_bytes'] / mib:.0f} MiB",
                     tutelp["peak_cuda_bytes"] / torchp["peak_cuda_bytes"]))
    lines = [f"`python bench/backends.py {' '.join(sys.argv[1:])}`: size {args.size}, global batch {args.batch_size}, "
             f"device {args.device}, {args.repeats} rotation(s), median step of {args.steps}", "",
             "| measure | torch backend | tutel backend | tutel / torch |", "|---|---|---|---|"]
    lines += [f"| {name} | {a} | {b} | {ratio:.2f}x |" for name, a, b, ratio in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="quickstart")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (split over the processes)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="rotations of torch, tutel; timings are the median")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process in the P-process runs")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", choices=BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    single, multi = one_process(args), many_processes(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"backends_{args.size}.json").write_text(json.dumps(dict(one_process=single, processes=multi,
                                                                    args=vars(args)), indent=2))
    text = table(single, multi, args)
    (out / f"backends_{args.size}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
