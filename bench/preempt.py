"""How long a preemption takes to save, against the grace periods that launchers and schedulers give before SIGKILL.

    python bench/preempt.py                      # quickstart + DeiT-S paper preset on CPU, one thread, ~3 min
    python bench/preempt.py --device cuda --deit-batch 128

1. Parts, in this process: for each model, the median training step at its batch and the median
   ``save_checkpoint`` (what a stop writes, flushed to disk): the slowest stop is one step plus one save.
2. End to end: a real ``accelerate launch`` run gets SIGTERM on its process group, as a preemption sends it, after a
   few steps; measured: seconds from the signal to the launcher's exit, and the save time the stop line reports.
   The DeiT-S run trains the offline ``digits`` task at 224 px (the paper's datasets need a network).

Writes ``bench/results/preempt.json`` and ``preempt.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GRACE_S = {"accelerate launch 1.16+, one process": 5, "docker stop": 10,
           "torchrun agent (accelerate launch, several processes)": 30, "Kubernetes default": 30,
           "SLURM KillWait default": 30}
MODELS = {
    "quickstart": (REPO / "configs" / "quickstart.yaml", []),
    "deit_s_paper": (REPO / "configs" / "paper_bsr.yaml", ["model.pretrained=false", "train.mixed_precision=no"]),
}


def measure_parts(name: str, batch: int | None, device: str, repeats: int) -> dict:
    """Median step and median checkpoint save of one model, in this process."""
    import torch
    from accelerate import Accelerator

    from moebsr.analysis.profiling import synthetic_labels, timed_calls, training_loss
    from moebsr.config import load_config
    from moebsr.training.build import model_from_config
    from moebsr.training.checkpoint import save_checkpoint
    from moebsr.training.optim import build_optimizer, build_scheduler
    from moebsr.training.run_data import RunData

    path, overrides = MODELS[name]
    config = load_config(path, overrides + ([f"train.batch_size={batch}"] if batch else []))
    tasks = RunData.from_config(config, check_data=False).tasks
    config.model.pretrained, config.model.checkpoint = False, None
    torch.manual_seed(0)
    model = model_from_config(config, {task_name: task.build_head for task_name, task in tasks.items()})
    accelerator = Accelerator(cpu=device == "cpu")
    optimizer = build_optimizer(model, config.train)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, build_scheduler(optimizer, config.train))
    size = int(model.backbone.patch_embed.img_size[0])
    images = torch.randn(config.train.batch_size, 3, size, size, device=accelerator.device)
    first = config.tasks[0]
    labels = {first: synthetic_labels({first: tasks[first].num_outputs}, len(images))[first].to(accelerator.device)}

    def step() -> None:
        training_loss(model, images, labels, config.moe.aux_loss_weight).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    steps = timed_calls(step, accelerator.device, repeats, warmup=1)
    root = Path(tempfile.mkdtemp(prefix="preempt-", dir=REPO / "runs" if (REPO / "runs").is_dir() else None))
    try:
        saves = timed_calls(lambda: save_checkpoint(accelerator, root, 1, {"step": 1}, keep=1), accelerator.device,
                            repeats, warmup=1)
        saved = root / "checkpoints" / "step_00000001"
        checkpoint_bytes = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    step_s, save_s = statistics.median(w for w, _ in steps), statistics.median(w for w, _ in saves)
    return dict(model=config.model.name, batch_size=config.train.batch_size, image_size=size, device=device,
                threads=torch.get_num_threads(), step_s=step_s, step_cpu_s=statistics.median(c for _, c in steps),
                save_s=save_s, save_cpu_s=statistics.median(c for _, c in saves), saves_s=[w for w, _ in saves],
                checkpoint_mib=checkpoint_bytes / 2 ** 20, worst_stop_s=step_s + save_s)


def preempt_once(name: str, batch: int | None, steps_before: int, env: dict) -> dict:
    """A real ``accelerate launch`` run, SIGTERM to its process group after ``steps_before`` logged steps."""
    path, overrides = MODELS[name]
    output = Path(tempfile.mkdtemp(prefix="preempt-run-"))
    extra = ["model.checkpoint=null"] if name == "quickstart" else ["tasks=[digits]", "data.num_workers=0"]
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1", "--num_machines",
               "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "launch" / "multitask.py"),
               "--config", str(path), *overrides, *extra, f"train.output_dir={output}", "train.steps=100000",
               "logging.trackers=[none]", "logging.progress=false", "train.checkpoint_every=0",
               *([f"train.batch_size={batch}"] if batch else [])]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    log, deadline = output / "train_log.jsonl", time.time() + 600
    try:
        while (not log.is_file() or len(log.read_text().splitlines()) < steps_before) and time.time() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"{name}: the run ended before the signal:\n{process.stderr.read()[-2000:]}")
            time.sleep(0.01)
        signalled = time.perf_counter()
        os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
        exited = time.perf_counter() - signalled
    finally:
        shutil.rmtree(output, ignore_errors=True)
    stopped = re.search(r"^stopped: SIGTERM at step (\d+) of \d+: saved \S+ (\d+\.\d) s after the signal", stderr,
                        re.MULTILINE)
    return dict(exit_code=process.returncode, signal_to_exit_s=exited, saved=bool(stopped),
                saved_after_s=float(stopped[2]) if stopped else None, step=int(stopped[1]) if stopped else None)


def write_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "preempt.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"Preemption stop time ({results['device']}, {results['threads']} thread(s), accelerate "
             f"{results['accelerate']}; `python bench/preempt.py`)", "",
             "| model | batch | step (s) | checkpoint (MiB) | save, flushed (s) | step + save (s) |",
             "|---|---|---|---|---|---|"]
    for name, part in results["parts"].items():
        lines.append(f"| {name} ({part['model']}, {part['image_size']} px) | {part['batch_size']} | "
                     f"{part['step_s']:.3f} | {part['checkpoint_mib']:.1f} | {part['save_s']:.3f} | "
                     f"{part['worst_stop_s']:.3f} |")
    lines += ["", "| model | SIGTERM to the process group: signal to exit (s), each run | save reported (s) | saved |",
              "|---|---|---|---|"]
    for name, runs in results["end_to_end"].items():
        exits = ", ".join(f"{run['signal_to_exit_s']:.2f}" for run in runs)
        saves = ", ".join(str(run["saved_after_s"]) for run in runs)
        lines.append(f"| {name} | {exits} | {saves} | {sum(run['saved'] for run in runs)}/{len(runs)} |")
    lines += ["", "Grace before SIGKILL: " + "; ".join(f"{k} {v} s" for k, v in GRACE_S.items()) + "."]
    (out / "preempt.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--deit-batch", type=int, default=8, help="DeiT-S batch (the paper's is 128; CPU: 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps and saves per model (median)")
    parser.add_argument("--runs", type=int, default=3, help="end-to-end preemptions per model")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    import accelerate
    import torch

    batches = {"quickstart": None, "deit_s_paper": args.deit_batch}
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    results = dict(device=args.device, threads=torch.get_num_threads(), accelerate=accelerate.__version__,
                   grace_s=GRACE_S, parts={}, end_to_end={})
    for name, batch in batches.items():
        results["parts"][name] = measure_parts(name, batch, args.device, args.repeats)
        print(name, json.dumps(results["parts"][name]), flush=True)
    for name, batch in batches.items():
        results["end_to_end"][name] = [preempt_once(name, batch, 3, env) for _ in range(args.runs)]
        print(name, json.dumps(results["end_to_end"][name]), flush=True)
    write_outputs(results, args.out)
    print((args.out / "preempt.md").read_text())


if __name__ == "__main__":
    main()
