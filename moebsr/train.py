"""The Accelerate multitask training loop: sample tasks, step, checkpoint, evaluate, export.

Readable as accelerate's own examples: ``prepare``, ``accumulate``, ``backward``, ``clip_grad_norm_``,
``gather_for_metrics``, ``save_state``/``load_state``, trackers. Everything specific to moebsr (task sampling,
shared-trunk joint batches, the MoE balancing loss, the BSR freeze) lives in the objects it calls.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from .build import check_config_against_model, image_spec_of, model_from_config
from .checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from .config import RunConfig, config_to_dict, save_config
from .run_data import RunData
from .evaluate import evaluate
from .expert_parallel import ShardedOptimizerState, clip_grad_norm_, exclude_sharded_from_ddp, parameter_count
from .export import export_run, write_text_atomically
from .model import MoEViT
from .optim import build_optimizer, build_scheduler
from .sampling import TaskSampler


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (e.g. too many non-finite losses in a row); saved work is intact."""


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    metrics: dict[str, dict[str, float]]
    losses: list[dict[str, Any]] = field(default_factory=list)


def make_accelerator(config: RunConfig) -> Accelerator:
    """CPU-aware Accelerator: ``cpu=True`` without CUDA makes ``--multi_gpu`` launches real gloo DDP; unused
    parameters (other tasks' heads and gates) are expected, so DDP is told to look for them."""
    trackers = [t for t in config.logging.trackers if t != "none"]
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.train.mixed_precision,
        gradient_accumulation_steps=config.train.grad_accum_steps,
        log_with=trackers or None,
        project_dir=config.train.output_dir,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        # train.steps counts optimizer steps of the global batch; a scheduler stepped with the optimizer would be
        # stepped num_processes times per step (accelerate assumes per-process epochs), running P times too fast
        step_scheduler_with_optimizer=False,
    )


def _flat_hparams(config: RunConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)
    walk("", config_to_dict(config))
    return flat


class _RunningLoss:
    """Exponential moving average per task, for the progress bar."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self.values: dict[str, float] = {}

    def update(self, task: str, value: float) -> None:
        previous = self.values.get(task)
        self.values[task] = value if previous is None else self.decay * previous + (1 - self.decay) * value

    def postfix(self) -> dict[str, str]:
        return {task: f"{value:.3f}" for task, value in self.values.items()}


def train(config: RunConfig, accelerator: Optional[Accelerator] = None) -> TrainResult:
    """Run one training job as configured; returns the final step and per-task metrics."""
    check_config_against_model(config)  # block indices, top-k, presets: before any data or weights
    data = RunData.from_config(config)  # tasks resolved (unknown names fail here), datasets checked
    accelerator = accelerator or make_accelerator(config)
    set_seed(config.train.seed, device_specific=False)
    output_dir = Path(config.train.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")

    model = model_from_config(config, data.heads())
    data.attach_image_spec(image_spec_of(model), accelerator)
    optimizer = build_optimizer(model, config.train)
    scheduler = build_scheduler(optimizer, config.train)
    sharded = exclude_sharded_from_ddp(model)  # tutel experts split over processes: not DDP's to all-reduce
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped: MoEViT = accelerator.unwrap_model(model)
    if sharded:
        accelerator.register_for_checkpointing(ShardedOptimizerState(unwrapped, optimizer))

    start_step = 0
    if config.train.resume:
        resume_path = resolve_resume(config.train.resume, output_dir)
        if resume_path is not None:
            state = load_checkpoint(accelerator, resume_path)
            start_step = int(state["step"])
            data.load_state_dict(state["data"])
            accelerator.print(f"resumed from {resume_path} at step {start_step}")

    sampler = TaskSampler(config.train.sampler, data.train_sizes(), data.sampling_weights(),
                          groups=data.joint_groups(), temperature=config.train.temperature, seed=config.train.seed)
    if accelerator.is_main_process and accelerator.log_with:
        accelerator.init_trackers("moebsr", config=_flat_hparams(config))
    log_path = output_dir / "train_log.jsonl"
    if accelerator.is_main_process:
        truncate_log(log_path, start_step)  # a killed run may have logged steps past its last checkpoint
    losses_seen: list[dict[str, Any]] = []
    running = _RunningLoss()
    bad_in_a_row = 0
    progress = tqdm(total=config.train.steps, initial=start_step, desc="train", dynamic_ncols=True,
                    disable=not (accelerator.is_local_main_process and config.logging.progress))
    accelerator.print(
        f"moebsr: {len(data.tasks)} task(s) {list(data.tasks)} · {accelerator.num_processes} process(es) on "
        f"{accelerator.device} · batch {config.train.batch_size}/process · sampler {config.train.sampler} · "
        f"trainable {parameter_count(unwrapped.trainable_parameters()):,} of "
        f"{parameter_count(unwrapped.parameters()):,} parameters"
        f"{f' ({len(sharded)} expert tensors sharded over the processes)' if sharded else ''} · output {output_dir}")
    model.train()
    step = start_step
    micro_step = start_step * config.train.grad_accum_steps
    metrics: dict[str, dict[str, float]] = {}
    while step < config.train.steps:
        tasks = sampler.tasks_for_step(micro_step)
        batch = data.next_train_batch(tasks)
        micro_step += 1
        with accelerator.accumulate(model):
            outputs = model(batch["images"], tasks)
            task_losses = {t: data.tasks[t].loss(outputs[t], batch["labels"][t]) for t in tasks}
            aux_loss = unwrapped.aux_loss()
            loss = sum(data.tasks[t].loss_weight * task_losses[t] for t in tasks) \
                + config.moe.aux_loss_weight * aux_loss
            if not _finite_everywhere(accelerator, loss):
                bad_in_a_row += 1
                optimizer.zero_grad(set_to_none=True)
                warnings.warn(f"step {step}: non-finite loss for {tasks}; step skipped "
                              f"({bad_in_a_row}/{config.train.max_bad_steps} in a row)", stacklevel=1)
                if bad_in_a_row >= config.train.max_bad_steps:
                    raise TrainingAborted(
                        f"train: {bad_in_a_row} non-finite losses in a row at step {step}; stopped without "
                        "saving (last good checkpoint kept). Try a lower train.lr or train.mixed_precision=no")
                continue
            bad_in_a_row = 0
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.train.grad_clip:
                clip_grad_norm_(accelerator, unwrapped.trainable_parameters(), config.train.grad_clip)
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        step += 1
        record = {"step": step, "tasks": tasks, "loss": loss.detach().item(), "aux_loss": aux_loss.detach().item(),
                  "lr": scheduler.get_last_lr()[0], **{f"{t}/loss": v.detach().item() for t, v in task_losses.items()}}
        losses_seen.append(record)
        for task, value in task_losses.items():
            running.update(task, value.detach().item())
        progress.update(1)
        progress.set_postfix(running.postfix(), refresh=False)
        if accelerator.is_main_process:
            with open(log_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if step % config.logging.log_every == 0 or step == config.train.steps:
            accelerator.log({k: v for k, v in record.items() if isinstance(v, float)}, step=step)
        if config.eval.every and step % config.eval.every == 0 and step < config.train.steps:
            metrics = _evaluate_and_log(accelerator, model, data, config, step)
            model.train()
        if config.train.checkpoint_every and step % config.train.checkpoint_every == 0 \
                and step < config.train.steps:
            save_checkpoint(accelerator, output_dir, step, {"step": step, "data": data.state_dict()},
                            config.train.keep_checkpoints)
    progress.close()

    save_checkpoint(accelerator, output_dir, step, {"step": step, "data": data.state_dict()},
                    config.train.keep_checkpoints)
    metrics = _evaluate_and_log(accelerator, model, data, config, step)
    state = unwrapped.state_dict()  # every process: sharded experts are gathered here
    if accelerator.is_main_process:
        export_run(output_dir, unwrapped, config, data.task_outputs(), metrics, state)
        with open(output_dir / "metrics.json", "w") as handle:
            json.dump({"step": step, "metrics": metrics}, handle, indent=2)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(output_dir, step, metrics, losses_seen)


def _finite_everywhere(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    """All processes must agree to skip a step, or DDP's collectives would desynchronise."""
    finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite, reduction="sum") / accelerator.num_processes
    return bool(finite.item() == 1.0)


def _evaluate_and_log(accelerator: Accelerator, model: torch.nn.Module, data: RunData, config: RunConfig,
                      step: int) -> dict[str, dict[str, float]]:
    metrics = evaluate(accelerator, model, data, split=config.eval.split, max_examples=config.eval.max_examples)
    accelerator.log({f"{task}/{name}": value for task, values in metrics.items() for name, value in values.items()},
                    step=step)
    accelerator.print(format_metrics(metrics, title=f"step {step} · {config.eval.split}"))
    return metrics


def format_metrics(metrics: Mapping[str, Mapping[str, float]], title: str = "") -> str:
    names = sorted({name for values in metrics.values() for name in values})
    width = max([len("task")] + [len(t) for t in metrics])
    lines = [title] if title else []
    lines.append(f"{'task':<{width}}  " + "  ".join(f"{n:>10}" for n in names))
    for task, values in metrics.items():
        lines.append(f"{task:<{width}}  " + "  ".join(_format_value(n, values.get(n)) for n in names))
    return "\n".join(lines)


def _format_value(name: str, value: Optional[float]) -> str:
    if value is None:
        return f"{'-':>10}"
    return f"{int(value):>10d}" if name == "examples" else f"{value:>10.4f}"


def truncate_log(path: Path, last_step: int) -> None:
    """Keep the records of steps up to ``last_step`` (all of them gone when starting from scratch)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    write_text_atomically(path, "".join(line + "\n" for line in kept))
