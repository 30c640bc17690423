"""All the data of one run: its tasks, a resumable train loader per task (or per joint group), eval loaders.

Loaders shard by ``(process_index, num_processes)`` themselves (every process derives the same permutation
from the seed), so they are not passed through ``accelerator.prepare``; with per-process batch ``B`` on ``P``
processes, global batch ``n`` is exactly the one-process batch ``n`` of size ``B*P``.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from accelerate import Accelerator

from ..config import RunConfig
from ..data import BatchLoader, ImageSpec, build_joint_loader, build_task_loader
from ..tasks import Task, TaskError, create_tasks, discover_tasks


def group_by_shared_dataset(tasks: Mapping[str, Task], names: Sequence[str]) -> list[list[str]]:
    """Tasks that label the same images, grouped in config order; a task without partners is alone."""
    groups: dict[Any, list[str]] = {}
    for name in names:
        key = tasks[name].shared_dataset
        groups.setdefault(key if key is not None else ("alone", name), []).append(name)
    return list(groups.values())


class RunData:
    """Tasks and loaders of a run. Build with :meth:`from_config` (checks every task and its data up front)."""

    def __init__(self, tasks: Mapping[str, Task], config: RunConfig) -> None:
        self.tasks = dict(tasks)
        self.config = config
        self.train_loaders: dict[tuple[str, ...], BatchLoader] = {}
        self.image_spec: Optional[ImageSpec] = None
        self.device = torch.device("cpu")
        self.process_index, self.num_processes = 0, 1

    @classmethod
    def from_config(cls, config: RunConfig, check_data: bool = True) -> "RunData":
        """Resolve the tasks (unknown names and bad options fail here) and, with ``check_data``, build their
        train and eval splits so missing or malformed data fails before any training starts."""
        discover_tasks(config.data.task_dirs)
        options = {name: dict(config.data.task_options.get(name, {})) for name in config.tasks}
        if config.train.label_smoothing:
            for name in config.tasks:
                options[name].setdefault("label_smoothing", config.train.label_smoothing)
        tasks = create_tasks(config.tasks, {k: v for k, v in options.items() if v})
        if check_data:
            for task in tasks.values():
                task.build_dataset("train")
                task.build_dataset(config.eval.split)
        return cls(tasks, config)

    # ---- what the model and the sampler need ---------------------------------------------------------------
    def heads(self) -> dict[str, Any]:
        return {name: task.build_head for name, task in self.tasks.items()}

    def task_outputs(self) -> dict[str, int]:
        return {name: task.num_outputs for name, task in self.tasks.items()}

    def class_names(self) -> dict[str, list[str]]:
        """The tasks that name their classes (a folder task's sub-folders, for one): kept in the export."""
        return {name: list(task.class_names) for name, task in self.tasks.items() if task.class_names is not None}

    def train_sizes(self) -> dict[str, int]:
        return {name: task.num_examples("train") for name, task in self.tasks.items()}

    def sampling_weights(self) -> dict[str, float]:
        return {name: task.sampling_weight for name, task in self.tasks.items()}

    def joint_groups(self) -> list[list[str]]:
        return group_by_shared_dataset(self.tasks, list(self.tasks))

    def train_groups(self) -> list[list[str]]:
        if self.config.train.sampler == "joint":
            return self.joint_groups()
        return [[name] for name in self.tasks]

    # ---- loaders -------------------------------------------------------------------------------------------
    def attach_image_spec(self, image_spec: Mapping[str, Any] | ImageSpec, accelerator: Accelerator,
                          build_train: bool = True) -> None:
        """Build the train loaders for the model's input format, sharded for this process."""
        self.image_spec = ImageSpec.coerce(image_spec)
        self.device = accelerator.device
        self.process_index, self.num_processes = accelerator.process_index, accelerator.num_processes
        train = self.config.train
        for group in self.train_groups() if build_train else []:
            self.train_loaders[tuple(group)] = self._loader(group, "train", train.batch_size, train=True)

    def _loader(self, group: Sequence[str], split: str, batch_size: int, train: bool) -> BatchLoader:
        if self.image_spec is None:
            raise RuntimeError("attach_image_spec() must run before loaders are built")
        cache = self.config.trunk_cache
        common = dict(image_spec=self.image_spec, batch_size=batch_size, train=train, seed=self.config.train.seed,
                      num_workers=self.config.data.num_workers, process_index=self.process_index,
                      num_processes=self.num_processes, device=self.device,  # batch image work on the device
                      augment_views=cache.views if cache.enabled and train else None)  # views a trunk cache can keep
        try:
            if len(group) == 1:
                return build_task_loader(self.tasks[group[0]], split, **common)
            return build_joint_loader([self.tasks[name] for name in group], split, **common)
        except ValueError as error:  # e.g. more processes than examples, a batch larger than the split
            if isinstance(error, TaskError):
                raise
            raise TaskError(f"task(s) {', '.join(group)}, split {split!r}: {error}") from None

    def _to_device(self, batch: Mapping[str, Any], group: Sequence[str]) -> dict[str, Any]:
        labels = batch["labels"] if isinstance(batch["labels"], Mapping) else {group[0]: batch["labels"]}
        return {"images": batch["images"].to(self.device, non_blocking=True),
                "labels": {name: labels[name].to(self.device, non_blocking=True) for name in group},
                "indices": batch.get("indices"), "view": batch.get("view", 0)}

    def next_train_batch(self, tasks: Sequence[str]) -> dict[str, Any]:
        key = tuple(tasks)
        if key not in self.train_loaders:
            known = [list(k) for k in self.train_loaders]
            raise TaskError(f"no train loader for tasks {list(tasks)}; loaders: {known}")
        return self._to_device(self.train_loaders[key].next_batch(), tasks)

    def eval_groups(self, task_names: Optional[Sequence[str]] = None) -> list[list[str]]:
        names = list(task_names) if task_names else list(self.tasks)
        for name in names:
            if name not in self.tasks:
                raise TaskError(f"--task: unknown task {name!r}; accepted: {', '.join(self.tasks)}")
        return group_by_shared_dataset(self.tasks, names)

    def eval_loader(self, group: Sequence[str], split: str, max_examples: Optional[int] = None
                    ) -> Iterator[dict[str, Any]]:
        """Evaluation batches in dataset order; with ``max_examples`` only the batches that cover the first
        ``max_examples`` examples (the caller keeps indices below it)."""
        loader = self._loader(group, split, self.config.eval.batch_size, train=False)
        covered_per_batch = loader.batch_size * self.num_processes
        limit = len(loader) if max_examples is None else min(len(loader), math.ceil(max_examples / covered_per_batch))
        try:
            for number, batch in enumerate(loader):
                if number >= limit:
                    break
                yield self._to_device(batch, group)
        finally:
            loader.close()

    def close(self) -> None:
        """Stop the training loaders' workers (at the end of training)."""
        for loader in self.train_loaders.values():
            loader.close()

    # ---- resume --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"/".join(key): loader.state_dict() for key, loader in self.train_loaders.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, loader in self.train_loaders.items():
            name = "/".join(key)
            if name not in state:
                raise TaskError(f"checkpoint has no loader state for {name!r} (it has {sorted(state)}); "
                                "resume with the same tasks and sampler")
            loader.load_state_dict(state[name])
