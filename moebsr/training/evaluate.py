"""Per-task evaluation: every metric of every task, over a whole split, on one or several processes.

Tasks that label the same images are evaluated on one pass (the shared trunk pays off at evaluation too).
Every process's outputs are gathered with their dataset indices, and the examples that shard padding repeated
are dropped by index (accelerate's ``gather_for_metrics`` can only do that for loaders it prepared), so metrics
over N processes equal those of one.
"""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING, Callable, Optional, Protocol, Sequence

import torch
from accelerate import Accelerator

if TYPE_CHECKING:
    from .run_data import RunData


class EvaluationData(Protocol):
    tasks: dict

    def eval_groups(self, task_names: Optional[Sequence[str]] = None) -> list[list[str]]:
        ...

    def eval_loader(self, group: Sequence[str], split: str, max_examples: Optional[int] = None):
        ...


class EvaluationStopped(RuntimeError):
    """A stop signal arrived during an evaluation, which was abandoned (every process at the same batch)."""

    def __init__(self, signal_number: int, batches_done: int) -> None:
        super().__init__(f"{signal.Signals(signal_number).name} after {batches_done} batch(es)")
        self.signal_number = signal_number


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, data: EvaluationData, split: str = "test",
             tasks: Optional[Sequence[str]] = None, max_examples: Optional[int] = None,
             stop_signal: Optional[Callable[[], int]] = None) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` for ``tasks`` (default: all) on ``split``.

    ``stop_signal`` (a collective every process calls, returning the agreed stop signal or 0) is asked before
    every batch; a non-zero answer raises :class:`EvaluationStopped`."""
    network = accelerator.unwrap_model(model)
    was_training = network.training
    network.eval()
    try:
        return _evaluate_groups(accelerator, network, data, split, tasks, max_examples, stop_signal)
    finally:
        network.train(was_training)


def _evaluate_groups(accelerator: Accelerator, network: torch.nn.Module, data: EvaluationData, split: str,
                     tasks: Optional[Sequence[str]], max_examples: Optional[int],
                     stop_signal: Optional[Callable[[], int]]) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    batches_done = 0
    for group in data.eval_groups(tasks):
        logits: dict[str, list[torch.Tensor]] = {task: [] for task in group}
        labels: dict[str, list[torch.Tensor]] = {task: [] for task in group}
        indices: list[torch.Tensor] = []
        for batch in data.eval_loader(group, split, max_examples):
            if stop_signal is not None and (signal_number := stop_signal()):
                raise EvaluationStopped(signal_number, batches_done)
            batches_done += 1
            with accelerator.autocast():
                outputs = network(batch["images"], group)
            indices.append(accelerator.gather(batch["indices"].to(accelerator.device)).cpu())
            for task in group:
                gathered_logits, gathered_labels = accelerator.gather(
                    (outputs[task].float().contiguous(), batch["labels"][task].contiguous()))
                logits[task].append(gathered_logits.cpu())
                labels[task].append(gathered_labels.cpu())
        keep = first_occurrences(torch.cat(indices), max_examples)
        for task in group:
            all_logits, all_labels = torch.cat(logits[task])[keep], torch.cat(labels[task])[keep]
            results[task] = {metric.name: metric.compute(all_logits, all_labels)
                             for metric in data.tasks[task].metrics}
            results[task]["examples"] = float(all_labels.numel())
    return results


def first_occurrences(indices: torch.Tensor, max_examples: Optional[int] = None) -> torch.Tensor:
    """Positions of the first occurrence of each dataset index (below ``max_examples`` if given)."""
    order = torch.argsort(indices, stable=True)
    sorted_indices = indices[order]
    first = torch.ones_like(sorted_indices, dtype=torch.bool)
    first[1:] = sorted_indices[1:] != sorted_indices[:-1]
    if max_examples is not None:
        first &= sorted_indices < max_examples
    return order[first]


def open_run(run_dir: str, tasks: Optional[Sequence[str]] = None, keep_rate: Optional[float] = None,
             batch_size: Optional[int] = None, weights: Optional[str] = None
             ) -> tuple[Accelerator, torch.nn.Module, "RunData"]:
    """A saved run's model (its weights loaded, prepared for this job's processes) and its evaluation data.

    ``keep_rate`` re-evaluates the same weights with another token budget (enabling dropping at the configured
    blocks if the run trained without it); ``tasks`` keeps only those tasks' data.
    """
    from pathlib import Path

    from ..config import config_from_dict
    from ..model.spec import check_keep_rate
    from ..tasks import TaskError
    from .build import image_spec_of, model_for_run
    from .export import find_weights, load_weights, read_run_document
    from .run_data import RunData

    document = read_run_document(run_dir)
    config = config_from_dict(document["config"])
    for name in tasks or ():
        if name not in config.tasks:
            raise TaskError(f"--task: unknown task {name!r}; this run has: {', '.join(config.tasks)}")
    weights_path = Path(weights) if weights else find_weights(run_dir)
    trained_with_dropping = config.token_drop.enabled
    if keep_rate is not None:
        config.token_drop.keep_rate = check_keep_rate(keep_rate, "--keep-rate")
        config.token_drop.enabled = True
    if batch_size is not None:
        config.eval.batch_size = batch_size
    config.tasks = list(tasks) if tasks else config.tasks
    config.data.task_options = {k: v for k, v in config.data.task_options.items() if k in config.tasks}
    data = RunData.from_config(config, check_data=False)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # first: a tutel model shards over its processes
    model = model_for_run(config, {**document["task_outputs"], **data.heads()}, document)
    # on the job's device before the state dict is read: with tutel's sharded experts that read all-gathers them,
    # and NCCL only gathers device tensors
    model = model.to(accelerator.device)
    load_weights(model, weights_path)
    if keep_rate is not None and not trained_with_dropping and accelerator.is_main_process:
        where = (f"the paper's 3/6/9 scaled to depth {model.depth}" if config.token_drop.blocks is None
                 else "token_drop.blocks of its config")
        print(f"--keep-rate {keep_rate:g}: this run trained without token dropping; it now drops at blocks "
              f"{list(model.token_drop_blocks)} ({where}), keeping {keep_rate:g} of the tokens at each",
              file=sys.stderr, flush=True)
    model = accelerator.prepare_model(model, evaluation_mode=True)
    data.attach_image_spec(image_spec_of(accelerator.unwrap_model(model)), accelerator, build_train=False)
    return accelerator, model, data


def evaluate_run(run_dir: str, tasks: Optional[Sequence[str]] = None, split: str = "test",
                 keep_rate: Optional[float] = None, max_examples: Optional[int] = None,
                 batch_size: Optional[int] = None, weights: Optional[str] = None) -> dict[str, dict[str, float]]:
    """Load an exported (or checkpointed) run and evaluate it (see :func:`open_run` for the options)."""
    from ..tasks import SPLITS, TaskError

    if split not in SPLITS:
        raise TaskError(f"--split: unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    accelerator, model, data = open_run(run_dir, tasks, keep_rate, batch_size, weights)
    return evaluate(accelerator, model, data, split=split, max_examples=max_examples)
