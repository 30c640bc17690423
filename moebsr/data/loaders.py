"""Batches for training and evaluation: ``{"images": float [B, C, H, W], "labels": int64 [B], "indices": int64 [B]}``
per task, or ``{"images", "labels": {task: int64 [B]}, "indices"}`` for tasks that label the same images (joint
batches). ``indices`` are the examples' positions in the split: evaluation uses them to drop the repeats that
shard padding adds.

Two paths, chosen by the dataset:
- uint8 tensor datasets (the packaged grey datasets): index the tensor, copy the uint8 batch to ``device`` (pinned
  and asynchronous on CUDA: a quarter of the bytes of the float batch), then augment, resize and normalise the
  whole batch there; ``num_workers`` is not used (no per-image work is left for workers to share).
- per-image datasets (hub datasets, image folders): a ``torch.utils.data.DataLoader`` with ``num_workers`` decodes
  and transforms each image (timm's ``create_transform`` unless the task gives its own), into pinned memory when
  ``device`` is CUDA, so the copy to the device overlaps compute. One DataLoader per BatchLoader serves every epoch,
  and with workers the same worker processes do (``persistent_workers``): none are started again at each epoch.

Resume: the batch order is a pure function of ``(seed, epoch)``, and each batch's random augmentation of
``(seed, epoch, batch)``, so ``state_dict()`` is just ``{"epoch", "position"}`` (``position`` = batches already
yielded in the epoch). Save it with the checkpoint and ``load_state_dict`` it after building the same loader; the
next batch is then exactly the one the interrupted run would have produced.

Sharding is done here, not by ``accelerate.prepare``: pass ``process_index``/``num_processes``; every process gets
the same number of batches (see ``EpochBatchSampler``).
"""

from __future__ import annotations

import random
import weakref
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader

from ..tasks.errors import TaskError
from ..tasks.spec import BatchAugment, Task
from ..training.interrupt import ignore_stop_signals
from .batch_ops import augment_batch, to_model_batch
from .image_datasets import ItemImageDataset, TensorImageDataset, to_pil
from .image_spec import ImageSpec
from .sampler import EpochBatchSampler
from .transforms import default_transform

Batch = dict[str, Any]


class _TransformedItems:
    """Dataset for the DataLoader: item ``(index, seed)`` -> ``(image tensor, index)``; a seed fixes the random
    transform of that image, whatever worker runs it (labels are attached in the main process)."""

    def __init__(self, dataset: ItemImageDataset, transform: Callable, in_chans: int, where: str) -> None:
        self.dataset, self.transform, self.in_chans, self.where = dataset, transform, in_chans, where

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, Optional[int]]) -> tuple[torch.Tensor, int]:
        index, seed = item
        image = to_pil(self.dataset.get_image(index), self.in_chans, f"{self.where}, example {index}")
        if seed is None:
            tensor = self.transform(image)
        else:
            python_state = random.getstate()
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                torch.manual_seed(seed)
                tensor = self.transform(image)
            random.setstate(python_state)
        if not isinstance(tensor, torch.Tensor):
            raise TaskError(f"{self.where}: the image transform returned {type(tensor).__name__}; expected a tensor")
        return tensor, index


def _collate(items: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([image for image, _ in items]), torch.tensor([index for _, index in items])


class _BatchRequests:
    """The batch sampler of a BatchLoader's one DataLoader: the ``(index, seed)`` items of the batches asked for next.

    The DataLoader (and its persistent workers) outlives epochs; what it yields is whatever ``batches`` holds when an
    iteration starts, set from ``EpochBatchSampler`` for ``(epoch, position)``, so order, seeds and resume are the
    sampler's exactly.
    """

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, Optional[int]]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, Optional[int]]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class BatchLoader:
    """Batches of one dataset, labelled for one task or (``joint``) several; iterate for the rest of the epoch,
    or call ``next_batch()`` to cycle through epochs forever."""

    def __init__(self, dataset: Union[TensorImageDataset, ItemImageDataset], labels: Mapping[str, torch.Tensor],
                 image_spec: Union[ImageSpec, Mapping[str, Any]], batch_size: int, train: bool, seed: int = 0,
                 num_workers: int = 0, drop_last: Optional[bool] = None, augment: BatchAugment = BatchAugment(),
                 transform: Optional[Callable] = None, process_index: int = 0, num_processes: int = 1,
                 joint: bool = False, name: str = "loader", device: Optional[Union[torch.device, str]] = None,
                 augment_views: Optional[int] = None) -> None:
        self.dataset, self.labels, self.train, self.joint, self.name = dataset, dict(labels), train, joint, name
        if augment_views is not None and augment_views < 0:
            raise ValueError(f"{name}: augment_views={augment_views}; accepted: None, 0 or a count >= 1")
        # None: a new random augmentation every epoch; 0: none; K: K fixed views, epoch e shows view e mod K
        self.augment_views = augment_views
        self.augments = train and augment_views != 0
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.image_spec = ImageSpec.coerce(image_spec)
        self.augment, self.num_workers = augment, num_workers
        self.transform = transform
        self.sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=train, seed=seed,
                                         drop_last=train if drop_last is None else drop_last,
                                         process_index=process_index, num_processes=num_processes)
        self.epoch = 0
        self.position = 0
        self._cycle: Optional[Iterator[Batch]] = None
        self._requests = _BatchRequests()
        self._item_loader: Optional[DataLoader] = None
        self._workers_finalizer: Optional[weakref.finalize] = None

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def __iter__(self) -> Iterator[Batch]:
        """The batches left in the current epoch; finishing it moves to the next epoch."""
        source = self._tensor_batches if isinstance(self.dataset, TensorImageDataset) else self._item_batches
        for number, images, indices in source(self.epoch, self.position):
            self.position = number + 1
            yield self._batch(images, indices)
        self.epoch, self.position = self.epoch + 1, 0

    def next_batch(self) -> Batch:
        """The next batch, crossing epoch boundaries (for step-based training loops)."""
        while True:
            if self._cycle is None:
                self._cycle = iter(self)
            try:
                return next(self._cycle)
            except StopIteration:
                self._cycle = None

    def view_of(self, epoch: int) -> int:
        """Which augmentation an epoch shows: the epoch itself, or with ``augment_views=K`` one of K fixed views
        (what lets a cache of the frozen trunk's output serve later epochs; 0 without augmentation)."""
        return epoch % self.augment_views if self.augment_views else (0 if self.augment_views == 0 else epoch)

    def _batch(self, images: torch.Tensor, indices: torch.Tensor) -> Batch:
        labels = {task: values[indices] for task, values in self.labels.items()}
        return {"images": images, "labels": labels if self.joint else next(iter(labels.values())), "indices": indices,
                "view": self.view_of(self.epoch)}

    def _tensor_batches(self, epoch: int, start: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        augment = self.augments and (self.augment.crop_padding > 0 or self.augment.hflip)
        for number, indices in self.sampler.batches(epoch, start):
            images = self._on_device(self.dataset.images[indices])
            if augment:
                seeds = self._on_device(self.sampler.example_seeds(self.view_of(epoch), indices))
                images = augment_batch(images, self.augment, seeds)
            yield number, to_model_batch(images, self.image_spec), indices

    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """On CUDA a pinned, asynchronous copy: one from pageable memory would wait for the GPU to finish its queue."""
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _item_batches(self, epoch: int, start: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        numbered = list(self.sampler.batches(epoch, start))
        batches = []
        for number, indices in numbered:
            seeds = (self.sampler.example_seeds(self.view_of(epoch), indices).tolist() if self.augments
                     else [None] * len(indices))
            batches.append(list(zip(indices.tolist(), seeds)))
        self._requests.batches = batches  # before iter(): a (re)started iteration reads them at once
        for (number, _), (images, indices) in zip(numbered, self._items_loader()):
            yield number, images, indices

    def _items_loader(self) -> DataLoader:
        """The per-image DataLoader, built at first use and kept: with workers, the same processes serve every epoch
        (``persistent_workers``), each keeping two batches in flight (``prefetch_factor``)."""
        if self._item_loader is None:
            transform = (self.transform or default_transform)(self.image_spec, self.augments)
            workers = self.num_workers
            self._item_loader = DataLoader(
                _TransformedItems(self.dataset, transform, self.image_spec.in_chans, self.name),
                batch_sampler=self._requests, num_workers=workers, collate_fn=_collate,
                pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                prefetch_factor=2 if workers > 0 else None, worker_init_fn=ignore_stop_signals if workers else None,
                generator=torch.Generator().manual_seed(self.sampler.seed))  # not the global RNG
            if workers:  # stopped when this loader is closed, collected, or left open at exit
                self._workers_finalizer = weakref.finalize(self, _stop_workers, self._item_loader)
        return self._item_loader

    def close(self) -> None:
        """Stop the per-image workers now: left to the garbage collector, a loader with batches in flight stalls its
        collection for ~10 s (two 5 s joins), while a shutdown takes milliseconds."""
        if self._workers_finalizer is not None:
            self._workers_finalizer()
        self._item_loader, self._cycle, self._workers_finalizer = None, None, None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_examples": len(self.dataset),
                "batch_size": self.batch_size, "seed": self.sampler.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue where a saved loader stopped; it must describe the same data, batch size and seed."""
        for key in ("num_examples", "batch_size", "seed"):
            if key in state and int(state[key]) != self.state_dict()[key]:
                raise ValueError(f"{self.name}: cannot resume: saved {key}={state[key]}, this loader has "
                                 f"{self.state_dict()[key]}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._cycle = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position, self._cycle = epoch, 0, None


def build_task_loader(task: Task, split: str, image_spec: Union[ImageSpec, Mapping[str, Any]], batch_size: int,
                      train: bool, seed: int = 0, num_workers: int = 0, drop_last: Optional[bool] = None,
                      process_index: int = 0, num_processes: int = 1,
                      device: Optional[Union[torch.device, str]] = None,
                      augment_views: Optional[int] = None) -> BatchLoader:
    """Batches ``{"images", "labels"}`` of one task's split. ``train`` shuffles, augments (see
    :meth:`BatchLoader.view_of` for ``augment_views``) and (by default) drops the last short batch; evaluation keeps
    dataset order."""
    dataset = task.build_dataset(split)
    transform = task.train_transform if train and augment_views != 0 else task.eval_transform
    return BatchLoader(dataset, {task.name: dataset.labels}, image_spec, batch_size, train, seed, num_workers,
                       drop_last, task.batch_augment, transform, process_index, num_processes,
                       name=f"task {task.name!r}, split {split!r}", device=device, augment_views=augment_views)


def build_joint_loader(tasks: Sequence[Task], split: str, image_spec: Union[ImageSpec, Mapping[str, Any]],
                       batch_size: int, train: bool, seed: int = 0, num_workers: int = 0,
                       drop_last: Optional[bool] = None, process_index: int = 0, num_processes: int = 1,
                       device: Optional[Union[torch.device, str]] = None,
                       augment_views: Optional[int] = None) -> BatchLoader:
    """One image batch labelled for every task in ``tasks``: ``{"images", "labels": {task: labels}}``.

    Raises:
        TaskError: the tasks do not declare the same ``shared_dataset``, or their datasets differ in size.
    """
    if not tasks:
        raise TaskError("joint loader: no tasks given")
    keys = {task.name: task.shared_dataset for task in tasks}
    if len(tasks) > 1 and (None in keys.values() or len(set(keys.values())) != 1):
        raise TaskError(f"joint loader: tasks {list(keys)} do not share a dataset (shared_dataset keys {keys}); "
                        "only tasks with the same shared_dataset can share image batches")
    datasets = {task.name: task.build_dataset(split) for task in tasks}
    first = tasks[0]
    reference = datasets[first.name]
    for name, dataset in datasets.items():
        same_images = (type(dataset) is type(reference) and len(dataset) == len(reference) and
                       (not isinstance(dataset, TensorImageDataset) or dataset.images.shape == reference.images.shape))
        if not same_images:
            raise TaskError(f"joint loader: task {name!r} has {len(dataset)} {split} examples but {first.name!r} has "
                            f"{len(reference)}; tasks sharing {keys[first.name]!r} must label the same images")
    augment = first.batch_augment
    for task in tasks[1:]:
        augment = augment.intersect(task.batch_augment)
    transform = first.train_transform if train and augment_views != 0 else first.eval_transform
    return BatchLoader(reference, {name: dataset.labels for name, dataset in datasets.items()}, image_spec,
                       batch_size, train, seed, num_workers, drop_last, augment, transform, process_index,
                       num_processes, joint=True, name=f"joint loader {list(keys)}, split {split!r}", device=device,
                       augment_views=augment_views)


def _stop_workers(loader: DataLoader) -> None:
    """torch's own teardown of a multi-process iterator, run by us while its queues still work: the workers ignore
    SIGTERM (a preemption signals the whole job, see ``ignore_stop_signals``), and SIGTERM is what torch falls back
    on when a collected iterator's queues are already gone, and what multiprocessing's exit handler sends before
    joining daemon processes without a time limit."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is None or not hasattr(iterator, "_shutdown_workers"):
        return
    iterator._shutdown_workers()
    for worker in iterator._workers:
        if worker.is_alive():  # did not answer the shutdown request: torch's SIGTERM does not reach it
            worker.kill()
            worker.join(timeout=5)
