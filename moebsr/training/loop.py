"""The Accelerate multitask training loop: sample tasks, step, checkpoint, evaluate, export.

Readable as accelerate's own examples: ``prepare``, ``accumulate``, ``backward``, ``clip_grad_norm_``,
``gather_for_metrics``, ``save_state``/``load_state``, trackers. Everything specific to moebsr (task sampling,
shared-trunk joint batches, the MoE balancing loss, the BSR freeze) lives in the objects it calls.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from ..config import EvalConfig, LoggingConfig, RunConfig, TrainConfig, config_to_dict, save_config
from ..errors import require_extra
from ..model import MoEViT
from .build import check_config_against_model, image_spec_of, model_from_config
from .checkpoint import (
    check_same_schedule,
    checkpoint_dir,
    load_checkpoint,
    read_training_state,
    resolve_resume,
    save_checkpoint,
    schedule_of,
)
from .ddp import check_every_parameter_reached, unused_parameters_reason
from .evaluate import EvaluationStopped, evaluate
from .expert_parallel import (
    ShardedOptimizerState,
    check_precision_with_sharding,
    clip_grad_norm_,
    exclude_sharded_from_ddp,
    parameter_count,
)
from .export import card_value, export_run, write_run_document, write_text_atomically
from .interrupt import StopRequest, TrainingInterrupted
from .optim import build_optimizer, build_scheduler
from .recipe import describe_recipe
from .run_data import RunData
from .run_folder import LOG_FILE, check_output_dir, clear_run_outputs, set_aside_log
from .sampling import TaskSampler
from .trunk_cache import build_trunk_caches, check_cacheable, describe_trunk_caches, remove_trunk_caches

# DDP models of multi-process runs, never freed: freeing one frees its gloo process group, whose destructor joins a
# worker thread while holding the GIL; that thread may need the GIL to release the tensors of a finished collective,
# and the run then hangs as it returns (seen once in CI's 2-process test). Such a run leaves through os._exit
# (runner.clean_exit), which frees nothing.
_KEPT_UNTIL_EXIT: list[torch.nn.Module] = []


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (e.g. too many non-finite losses in a row); saved work is intact."""


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    metrics: dict[str, dict[str, float]]
    losses: list[dict[str, Any]] = field(default_factory=list)


def make_accelerator(config: RunConfig) -> Accelerator:
    """CPU-aware Accelerator: ``cpu=True`` without CUDA makes ``--multi_gpu`` launches real gloo DDP. Whether DDP
    looks for unused parameters is decided later, from the model (:func:`use_ddp_unused_search`)."""
    check_trackers(config.logging)
    trackers = [t for t in config.logging.trackers if t != "none"]
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.train.mixed_precision,
        gradient_accumulation_steps=config.train.grad_accum_steps,
        log_with=trackers or None,
        project_dir=config.train.output_dir,
        # train.steps counts optimizer steps of the global batch; a scheduler stepped with the optimizer would be
        # stepped num_processes times per step (accelerate assumes per-process epochs), running P times too fast
        step_scheduler_with_optimizer=False,
    )


def check_trackers(logging_config: LoggingConfig) -> None:
    """Refuse a tracker whose package is missing: accelerate would drop it with a warning, and log nothing."""
    if "tensorboard" in logging_config.trackers:
        require_extra("tensorboard", "logging.trackers: tensorboard", "tensorboard",
                      otherwise="logging.trackers=[none]")


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


TIME_KEYS = ("elapsed_s", "cpu_s")  # a record's clocks: logged, not averaged into TensorBoard


class LogWindow:
    """Means over the steps since the last tracker write: each task's loss over the steps that drew it, the total
    and balancing losses, the learning rate, and images/s. The sampler rotates tasks, so logging one step's
    record every ``log_every`` steps would show the same task each time and never the others."""

    def __init__(self) -> None:
        self._start()

    def _start(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.images = 0
        self.started = time.perf_counter()

    def add(self, record: Mapping[str, Any], images: int) -> None:
        for key, value in record.items():
            if key not in ("step", *TIME_KEYS) and isinstance(value, float):
                self.sums[key] = self.sums.get(key, 0.0) + value
                self.counts[key] = self.counts.get(key, 0) + 1
        self.images += images

    def means(self) -> dict[str, float]:
        values = {key: total / self.counts[key] for key, total in self.sums.items()}
        values["images_per_s"] = self.images / max(time.perf_counter() - self.started, 1e-9)
        self._start()
        return values


@dataclass
class _Run:
    """What setting up a run hands to its steps and its finish."""

    config: RunConfig
    accelerator: Accelerator
    data: RunData
    model: torch.nn.Module  # as prepared: DDP-wrapped in a multi-process run
    unwrapped: MoEViT
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: TaskSampler
    sharded: list[str]  # expert tensors split over the processes (tutel)
    unused_reason: Optional[str]  # why DDP searches for unused parameters (None: it does not)
    trunk_caches: dict[tuple[str, ...], Any]
    output_dir: Path
    start_step: int = 0
    check_reached: set[tuple[str, ...]] = field(default_factory=set)  # task sets checked once (DDP without search)


def train(config: RunConfig, accelerator: Optional[Accelerator] = None) -> TrainResult:
    """Run one training job as configured; returns the final step and per-task metrics."""
    run = set_up_run(config, accelerator)
    with StopRequest() as stop:  # SIGINT/SIGTERM: finish the step, save, exit
        step, stop_signal, records = train_steps(run, stop)
        if run.trunk_caches:
            run.accelerator.print(describe_trunk_caches(run.trunk_caches, config.trunk_cache))
            run.accelerator.wait_for_everyone()
            remove_trunk_caches(run.trunk_caches, run.accelerator.process_index)
        if stop_signal and step < config.train.steps:  # at the last step, finishing is the better stop
            _save_and_stop(run.accelerator, config.train, run.output_dir, step, run.data, stop_signal,
                           stop.seconds_since_request)
    # from here on (evaluation, export) a signal interrupts as usual: the final checkpoint is saved first
    metrics = finish_run(run, step)
    return TrainResult(run.output_dir, step, metrics, records)


def set_up_run(config: RunConfig, accelerator: Optional[Accelerator] = None) -> _Run:
    """Every check of the input first, then the run folder, the model, optimizer and data prepared, the resumed
    state, the trackers and the log: the steps start from what this returns."""
    check_config_against_model(config)  # block indices, top-k, presets: before any data or weights
    check_trackers(config.logging)
    data = RunData.from_config(config)  # tasks resolved (unknown names fail here), datasets checked
    accelerator = accelerator or make_accelerator(config)
    set_seed(config.train.seed, device_specific=False)
    model = model_from_config(config, data.heads())
    if config.trunk_cache.enabled:
        check_cacheable(model)  # a cache needs a frozen block before the first trainable one
    data.attach_image_spec(image_spec_of(model), accelerator)  # batch-size checks: the last bad input caught
    output_dir, resume_path = _open_run_folder(config, data, accelerator)
    optimizer = build_optimizer(model, config.train)
    scheduler = build_scheduler(optimizer, config.train)
    sharded = exclude_sharded_from_ddp(model)  # tutel experts split over processes: not DDP's to all-reduce
    check_precision_with_sharding(config.train.mixed_precision, sharded, accelerator.num_processes)
    sampler = TaskSampler(config.train.sampler, data.train_sizes(), data.sampling_weights(),
                          groups=data.joint_groups(), temperature=config.train.temperature, seed=config.train.seed)
    unused_reason = use_ddp_unused_search(accelerator, model, sampler, sharded)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if accelerator.num_processes > 1:
        _KEPT_UNTIL_EXIT.append(model)
    unwrapped: MoEViT = accelerator.unwrap_model(model)
    if sharded:
        accelerator.register_for_checkpointing(ShardedOptimizerState(unwrapped, optimizer))
    trunk_caches = build_trunk_caches(config, unwrapped, data.train_loaders, accelerator.device, output_dir,
                                      accelerator.process_index) if config.trunk_cache.enabled else {}
    run = _Run(config, accelerator, data, model, unwrapped, optimizer, scheduler, sampler, sharded, unused_reason,
               trunk_caches, output_dir)
    run.start_step = _resume(run, resume_path)
    _start_logs(run)
    return run


def _open_run_folder(config: RunConfig, data: RunData, accelerator: Accelerator) -> tuple[Path, Optional[Path]]:
    """Check the output folder and the checkpoint to resume from, then write the run's config and document; returns
    the folder and the checkpoint (``None``: a fresh start)."""
    output_dir = Path(config.train.output_dir)
    check_output_dir(output_dir, config.train.resume, config.train.overwrite)  # another run's folder: refused
    resume_path = resolve_resume(config.train.resume, output_dir) if config.train.resume else None
    if resume_path is not None:  # before the first write: a refused resume leaves the run folder as it was
        check_same_schedule(read_training_state(resume_path), config.train)
    if accelerator.is_main_process:  # the first write to the folder
        if config.train.overwrite and (removed := clear_run_outputs(output_dir)):
            accelerator.print(f"train.overwrite: removed {', '.join(removed)} from {output_dir}")
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
        write_run_document(output_dir, config, data.task_outputs(), {}, data.class_names())  # eval works mid-run
    return output_dir, resume_path


def _resume(run: _Run, resume_path: Optional[Path]) -> int:
    """Load the checkpoint ``train.resume`` named into the prepared objects; returns the step to start from."""
    resume = run.config.train.resume
    if not resume:
        return 0
    if resume_path is None:
        run.accelerator.print(f"train.resume={resume}: no checkpoint in {checkpoint_dir(run.output_dir)}; "
                              "starting from step 0")
        return 0
    state = load_checkpoint(run.accelerator, resume_path)
    run.data.load_state_dict(state["data"])
    run.accelerator.print(f"resumed from {resume_path} at step {int(state['step'])}")
    return int(state["step"])


def _start_logs(run: _Run) -> None:
    """Start the trackers, make the step log agree with the resumed step, and print what the run trains."""
    accelerator, config, unwrapped = run.accelerator, run.config, run.unwrapped
    if accelerator.is_main_process and accelerator.log_with:
        accelerator.init_trackers("moebsr", config=_flat_hparams(config))
    log_path = run.output_dir / LOG_FILE
    if accelerator.is_main_process:
        if run.start_step:
            truncate_log(log_path, run.start_step)  # a killed run may have logged steps past its last checkpoint
        elif (kept := set_aside_log(run.output_dir)) is not None:  # a run that saved nothing: its log stays
            accelerator.print(f"an earlier {log_path.name} without a checkpoint was kept as {kept.name}")
    accelerator.print(
        f"moebsr: {len(run.data.tasks)} task(s) {list(run.data.tasks)} · {accelerator.num_processes} process(es) on "
        f"{accelerator.device} · batch {config.train.batch_size}/process · sampler {config.train.sampler} · "
        f"trainable {parameter_count(unwrapped.trainable_parameters()):,} of "
        f"{parameter_count(unwrapped.parameters()):,} parameters"
        f"{f' ({len(run.sharded)} expert tensors sharded over the processes)' if run.sharded else ''} · "
        f"output {run.output_dir}")
    accelerator.print(describe_recipe(config, unwrapped, run.data.train_sizes(), run.data.task_outputs()))


def train_steps(run: _Run, stop: StopRequest) -> tuple[int, int, list[dict[str, Any]]]:
    """Optimizer steps until ``train.steps`` or a stop every process agreed on, evaluating and checkpointing on
    schedule; returns the last step, the agreed stop signal (0: none) and the steps' log records."""
    config, accelerator, train_config = run.config, run.accelerator, run.config.train
    log = StepLog(run)
    run.model.train()
    step = run.start_step
    micro_step = step * train_config.grad_accum_steps
    stop_signal = 0  # the signal every process agreed to stop on
    bad_in_a_row = 0
    while step < train_config.steps:
        if stop_signal and micro_step % train_config.grad_accum_steps == 0:
            break
        tasks = run.sampler.tasks_for_step(micro_step)
        batch = run.data.next_train_batch(tasks)
        micro_step += 1
        finite, agreed_signal, read = micro_step_update(run, tasks, batch, stop.signal_number)
        stop_signal = stop_signal or agreed_signal
        if not finite:
            bad_in_a_row += 1
            warnings.warn(f"step {step}: non-finite loss for {tasks}; step skipped "
                          f"({bad_in_a_row}/{train_config.max_bad_steps} in a row)", stacklevel=1)
            if bad_in_a_row >= train_config.max_bad_steps:
                raise TrainingAborted(
                    f"train: {bad_in_a_row} non-finite losses in a row at step {step}; stopped without "
                    "saving (last good checkpoint kept). Try a lower train.lr or train.mixed_precision=no")
            continue
        bad_in_a_row = 0
        if not accelerator.sync_gradients:
            continue
        step += 1
        log.add(step, tasks, read, images=len(batch["images"]) * accelerator.num_processes
                * train_config.grad_accum_steps)
        if config.eval.every and step % config.eval.every == 0 and step < train_config.steps:
            try:  # a long evaluation must not eat the launcher's grace period: a stop abandons it
                _evaluate_and_log(accelerator, run.model, run.data, config.eval, step,
                                  stop_signal=lambda: _agreed_signal(accelerator, stop.signal_number))
            except EvaluationStopped as stopped:
                accelerator.print(f"evaluation at step {step} abandoned: {stopped}")
                stop_signal = stopped.signal_number
                break
            run.model.train()
        if train_config.checkpoint_every and step % train_config.checkpoint_every == 0 and step < train_config.steps:
            save_checkpoint(accelerator, run.output_dir, step, _training_state(step, run.data, train_config),
                            train_config.keep_checkpoints)
    log.close()
    return step, stop_signal, log.records


def micro_step_update(run: _Run, tasks: list[str], batch: Mapping[str, Any], signal_number: Optional[int]
                      ) -> tuple[bool, int, list[float]]:
    """One micro-batch's forward and backward under ``accelerator.accumulate`` (the optimizer steps at the end of an
    accumulation); a loss not finite on some process skips it everywhere. Returns :func:`_agree`'s answer."""
    accelerator, unwrapped, optimizer = run.accelerator, run.unwrapped, run.optimizer
    with accelerator.accumulate(run.model):
        cache = run.trunk_caches.get(tuple(tasks))
        outputs = cache.forward(run.model, unwrapped, batch["images"], batch["indices"], batch["view"]) \
            if cache is not None else run.model(batch["images"], tasks)
        task_losses = {t: run.data.tasks[t].loss(outputs[t], batch["labels"][t]) for t in tasks}
        aux_loss = unwrapped.aux_loss()
        loss = sum(run.data.tasks[t].loss_weight * task_losses[t] for t in tasks) \
            + run.config.moe.aux_loss_weight * aux_loss
        finite, agreed_signal, read = _agree(accelerator, [loss, aux_loss, *task_losses.values()], signal_number)
        if not finite:
            del outputs, task_losses, aux_loss, loss  # free this graph now, not after the next forward
            optimizer.zero_grad(set_to_none=True)
            return finite, agreed_signal, read
        accelerator.backward(loss)
        if accelerator.num_processes > 1 and run.unused_reason is None and accelerator.sync_gradients \
                and tuple(tasks) not in run.check_reached:  # once per task set: a wrong decision stops here
            check_every_parameter_reached(unwrapped, tasks, run.sharded)
            run.check_reached.add(tuple(tasks))
        if accelerator.sync_gradients and run.config.train.grad_clip:
            clip_grad_norm_(accelerator, unwrapped.trainable_parameters(), run.config.train.grad_clip)
        optimizer.step()
        if accelerator.sync_gradients:
            run.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return finite, agreed_signal, read


class StepLog:
    """Where each optimizer step's record goes: the run's JSON-lines log, the progress bar (running losses) and the
    trackers (means over ``logging.log_every`` steps)."""

    def __init__(self, run: _Run) -> None:
        self.accelerator, self.config, self.scheduler = run.accelerator, run.config, run.scheduler
        self.path = run.output_dir / LOG_FILE
        self.records: list[dict[str, Any]] = []
        self.running = _RunningLoss()
        self.window = LogWindow()
        self.progress = tqdm(total=self.config.train.steps, initial=run.start_step, desc="train", dynamic_ncols=True,
                             disable=not (self.accelerator.is_local_main_process and self.config.logging.progress))
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def add(self, step: int, tasks: list[str], read: list[float], images: int) -> None:
        """``read``: the step's loss, balancing loss, then each task's loss, in ``tasks`` order."""
        record = {"step": step, "tasks": tasks, "loss": read[0], "aux_loss": read[1],
                  "lr": self.scheduler.get_last_lr()[0], **{f"{t}/loss": v for t, v in zip(tasks, read[2:])},
                  "elapsed_s": round(time.perf_counter() - self.started, 3),  # wall clock since the loop began
                  "cpu_s": round(time.process_time() - self.cpu_started, 3)}  # this process's CPU time, likewise
        self.records.append(record)
        self.window.add(record, images=images)
        for task, value in zip(tasks, read[2:]):
            self.running.update(task, value)
        self.progress.update(1)
        self.progress.set_postfix(self.running.postfix(), refresh=False)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if step % self.config.logging.log_every == 0 or step == self.config.train.steps:
            self.accelerator.log(self.window.means(), step=step)  # every task, whichever tasks this step drew

    def close(self) -> None:
        self.progress.close()


def finish_run(run: _Run, step: int) -> dict[str, dict[str, float]]:
    """The final checkpoint, evaluation and export (``model.safetensors``, ``config.json``, card, ``metrics.json``)."""
    accelerator, config, output_dir = run.accelerator, run.config, run.output_dir
    save_checkpoint(accelerator, output_dir, step, _training_state(step, run.data, config.train),
                    config.train.keep_checkpoints)
    run.data.close()
    metrics = _evaluate_and_log(accelerator, run.model, run.data, config.eval, step)
    state = run.unwrapped.state_dict()  # every process: sharded experts are gathered here
    if accelerator.is_main_process:
        export_run(output_dir, run.unwrapped, config, run.data.task_outputs(), metrics, state, run.data.class_names())
        with open(output_dir / "metrics.json", "w") as handle:
            json.dump({"step": step, "metrics": metrics}, handle, indent=2)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def use_ddp_unused_search(accelerator: Accelerator, model: MoEViT, sampler: TaskSampler, sharded: list[str]
                          ) -> Optional[str]:
    """Tell DDP (read by ``prepare``) to search each step for unused parameters only when some step can leave one
    out; returns why it must (``None``: it need not), and prints the decision in a multi-process run."""
    reason = unused_parameters_reason(model, model.task_names, sampler.step_task_sets(), sharded)
    if accelerator.num_processes > 1:
        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=reason is not None)
        accelerator.print(f"DDP: searching every step for unused parameters: {reason}" if reason else
                          "DDP: no search for unused parameters (every step reaches every trained parameter)")
    return reason


def _agree(accelerator: Accelerator, losses: list[torch.Tensor], signal_number: Optional[int]
           ) -> tuple[bool, int, list[float]]:
    """Whether the loss (``losses[0]``) is finite on every process, the signal any process was asked to stop on
    (0: none), and this process's ``losses`` as floats for the log.

    All processes must agree to skip a step or to stop at it, or DDP's collectives would desynchronise; both
    answers travel in one small all-reduce, and everything the step logs comes back in the same single read
    from the device (the loop's one host sync per micro-step)."""
    values = torch.stack([value.detach().float() for value in losses])
    flags = torch.stack([(~torch.isfinite(values[0])).float(),
                         torch.tensor(float(signal_number or 0), device=values.device)])
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    not_finite, agreed_signal, *read = torch.cat([flags, values]).tolist()
    return not_finite == 0.0, int(agreed_signal), read


def _training_state(step: int, data: RunData, train_config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint records beside accelerate's state: the step, the loaders' places, the schedule it follows."""
    return {"step": step, "data": data.state_dict(), "schedule": schedule_of(train_config)}


def _agreed_signal(accelerator: Accelerator, signal_number: Optional[int]) -> int:
    """The stop signal any process was asked to stop on (0: none), agreed by all of them."""
    flag = torch.tensor([float(signal_number or 0)], device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


def _save_and_stop(accelerator: Accelerator, train_config: TrainConfig, output_dir: Path, step: int, data: RunData,
                   signal_number: int, seconds_since_signal: Callable[[], float]) -> None:
    """Save a complete checkpoint at the last finished step, then stop with one line saying how to resume and how
    long the stop took (to compare with the launcher's grace period before SIGKILL)."""
    import signal

    path = save_checkpoint(accelerator, output_dir, step, _training_state(step, data, train_config),
                           train_config.keep_checkpoints)
    saved_after = seconds_since_signal()
    data.close()  # loader workers stop now, not at garbage collection (seconds the launcher may not wait)
    accelerator.end_training()
    raise TrainingInterrupted(
        f"{signal.Signals(signal_number).name} at step {step} of {train_config.steps}: saved {path} "
        f"{saved_after:.1f} s after the signal; continue with the same command and train.resume=latest",
        signal_number)


def _evaluate_and_log(accelerator: Accelerator, model: torch.nn.Module, data: RunData, eval_config: EvalConfig,
                      step: int, stop_signal: Optional[Callable[[], int]] = None) -> dict[str, dict[str, float]]:
    metrics = evaluate(accelerator, model, data, split=eval_config.split, max_examples=eval_config.max_examples,
                       stop_signal=stop_signal)
    accelerator.log({f"{task}/{name}": value for task, values in metrics.items() for name, value in values.items()},
                    step=step)
    accelerator.print(format_metrics(metrics, title=f"step {step} · {eval_config.split}"))
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
    return f"{card_value(name, value):>10}"


def truncate_log(path: Path, last_step: int) -> None:
    """Keep the records of steps up to ``last_step``, where the same run resumes."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    write_text_atomically(path, "".join(line + "\n" for line in kept))
