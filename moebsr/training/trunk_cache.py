"""A per-image cache of the frozen trunk's output: later epochs start at the first trainable block.

The blocks before the first trainable block are a fixed function of the image (frozen weights, eval mode, no
autograd), so for the same image and augmentation they compute the same thing every epoch (AutoFreeze, Egeria).
:class:`TrunkCache` stores that result, the :class:`~moebsr.model.moevit.TrunkState` (tokens after those blocks, the
token-dropping decisions they made, and the task split if a per-task-routed block is among them), per image and
augmented view, in bf16/fp16 (or fp32), up to a size bound, in the training device's memory or in memory-mapped files.

Augmentation: a new random augmentation per epoch would never repeat, so while cached the training loader either
augments not at all (``views: 0``) or shows one of K fixed augmented views per image (``views: K``, epoch e shows
view e mod K), and the cache keys are (image, view).

Exactness: the tokens a cached run trains on are rounded to the cache dtype whether they were read back or computed
now (an image past the size bound, or seen for the first time), so no image trains on more precise tokens for not
having been stored. Read back, an entry equals its recomputation in the same batch exactly; in another batch, only to
float rounding (the grouped expert dispatch rounds a row differently with other rows beside it, ~1e-7), so a cached
run follows an uncached one to float noise, not bit for bit (tested both ways).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from einops import rearrange

from ..config import ConfigError
from ..model.moevit import MoEViT, TrunkState
from ..model.token_drop import TokenSelection
from .run_folder import TRUNK_CACHE_FOLDER

CACHE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TrunkCacheError(ConfigError):
    """A trunk cache that cannot work for this model (nothing frozen before the first trainable block)."""


def check_cacheable(model: MoEViT) -> int:
    """The index of the first trainable block, which must leave at least one frozen block to cache."""
    first = model.first_grad_block()
    if first <= 0:
        what = "the embeddings train" if first == -1 else "block 0 trains"
        raise TrunkCacheError(f"trunk_cache.enabled: nothing to cache ({what}); accepted: a model whose first "
                              "trainable block comes after block 0 (e.g. bsr.preset=last_k), or "
                              "trunk_cache.enabled=false")
    return first


@dataclass
class _Layout:
    """How a :class:`TrunkState` of this group is laid out per image: which fields, how many rows each image has in
    each (1 while the stream is shared, one per task after the split), and the shapes of one image's entry."""

    shared: bool
    kept_shared: dict[int, bool]
    has_ranking: bool
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]

    def bytes_per_image(self) -> int:
        return sum(math.prod(shape) * torch.empty((), dtype=self.dtypes[name]).element_size()
                   for name, shape in self.shapes.items())


class TrunkCache:
    """The frozen trunk's output for the images of one training loader (one task, or one joint group of tasks).

    Args:
        tasks: The tasks of the loader's batches (the state depends on them once a per-task block is frozen).
        num_keys: ``images * max(views, 1)``: every (image, view) the loader can produce.
        views: The loader's ``augment_views`` (0: no augmentation).
        dtype: ``bf16``, ``fp16`` or ``fp32``: what the trunk's tokens are stored and rounded in.
        max_bytes: Bound on what this cache stores; past it, images are computed every time.
        device: Where ``memory`` entries live (the training device).
        folder: For ``disk``: where the memory-mapped files go (``None``: in memory).
    """

    def __init__(self, tasks: Sequence[str], num_keys: int, views: int, dtype: str, max_bytes: int,
                 device: torch.device, folder: Optional[Path] = None) -> None:
        self.tasks = list(tasks)
        self.views = views
        self.dtype = CACHE_DTYPES[dtype]
        self.max_bytes = max_bytes
        self.device = device
        self.folder = folder
        self.slot_of = torch.full((num_keys,), -1, dtype=torch.int64)  # on the host: lookups need no device read
        self.layout: Optional[_Layout] = None
        self.store: dict[str, torch.Tensor] = {}
        self.capacity = 0
        self.used = 0
        self.hits = self.misses = 0

    # ---- the training step's forward ------------------------------------------------------------------------
    def forward(self, model: nn.Module, network: MoEViT, images: torch.Tensor, indices: torch.Tensor,
                view: int) -> dict[str, torch.Tensor]:
        """Logits of ``model`` (the prepared, possibly DDP-wrapped model) on the batch, starting from the cached
        trunk where it holds these images; ``network`` is the unwrapped model that computes what is missing."""
        keys = indices.to(torch.int64) * max(self.views, 1) + (view if self.views else 0)
        slots = self.slot_of[keys]
        hit = slots >= 0  # on the host, as slot_of is: counting and splitting the batch read nothing back
        hits = int(hit.sum())
        self.hits += hits
        self.misses += len(keys) - hits
        parts = []  # (batch rows, per-image fields) of the images computed now and of those read back
        if hits < len(keys):
            missing = (~hit).nonzero().flatten()
            with torch.no_grad():
                computed = self._per_image(network.forward_frozen_trunk(images[missing.to(images.device)], self.tasks))
            self._put(keys[missing], computed)
            parts.append((missing, computed))
        if hits:
            parts.append((hit.nonzero().flatten(), self._get(slots[hit])))
        per_image = parts[0][1] if len(parts) == 1 else self._merge(parts, len(keys))
        return model(images, self.tasks, trunk=self._state(per_image, len(keys), images.dtype))

    @staticmethod
    def _merge(parts: list[tuple[torch.Tensor, dict[str, torch.Tensor]]], batch: int) -> dict[str, torch.Tensor]:
        """One batch's per-image fields from its parts, each row back in its place in the batch."""
        first = parts[0][1]
        merged = {name: value.new_empty((batch, *value.shape[1:])) for name, value in first.items()}
        for rows, fields in parts:
            for name, value in fields.items():
                target = merged[name]
                target[rows.to(target.device)] = value.to(target.device)
        return merged

    def stats(self) -> dict[str, Any]:
        stored = self.used * (self.layout.bytes_per_image() if self.layout else 0)
        return dict(hits=self.hits, misses=self.misses, images_stored=self.used, capacity=self.capacity,
                    bytes_stored=stored)

    # ---- layout ---------------------------------------------------------------------------------------------
    def _per_image(self, state: TrunkState) -> dict[str, torch.Tensor]:
        """A state as per-image tensors ``[images, rows per image, ...]``, the tokens rounded to the cache dtype."""
        def per_image(tensor: torch.Tensor, shared: bool) -> torch.Tensor:
            return rearrange(tensor, "(r b) ... -> b r ...", r=1 if shared else len(self.tasks))

        fields = {"tokens": per_image(state.tokens, state.shared).to(self.dtype),
                  "origin": per_image(state.selection.origin, state.shared)}
        if state.selection.ranking is not None:
            fields["ranking"] = per_image(state.selection.ranking, state.shared)
        if state.selection.rope is not None:  # EVA-02: each present token's rotary row travels with it
            fields["rope"] = per_image(state.selection.rope, state.shared)
        for index, (origin, was_shared) in state.kept.items():
            fields[f"kept{index}"] = per_image(origin, was_shared)
        if self.layout is None:
            self.layout = _Layout(state.shared, {i: was_shared for i, (_, was_shared) in state.kept.items()},
                                  state.selection.ranking is not None,
                                  {name: tuple(value.shape[1:]) for name, value in fields.items()},
                                  {name: value.dtype for name, value in fields.items()})
        return fields

    def _state(self, fields: dict[str, torch.Tensor], batch: int, dtype: torch.dtype) -> TrunkState:
        layout = self.layout
        assert layout is not None

        def rows(tensor: torch.Tensor) -> torch.Tensor:
            return rearrange(tensor, "b r ... -> (r b) ...")

        selection = TokenSelection(rows(fields["origin"]), rows(fields["ranking"]) if layout.has_ranking else None,
                                   rows(fields["rope"]) if "rope" in layout.shapes else None)
        kept = {index: (rows(fields[f"kept{index}"]), was_shared) for index, was_shared in layout.kept_shared.items()}
        task_rows = None if layout.shared else [(task, t * batch, (t + 1) * batch) for t, task in enumerate(self.tasks)]
        return TrunkState(rows(fields["tokens"]).to(dtype), selection, self.tasks, batch, task_rows, layout.shared,
                          kept)

    # ---- storage --------------------------------------------------------------------------------------------
    def _allocate(self) -> None:
        layout = self.layout
        assert layout is not None
        self.capacity = min(len(self.slot_of), self.max_bytes // max(layout.bytes_per_image(), 1))
        for name, shape in layout.shapes.items():
            dtype = self.dtype if name == "tokens" else layout.dtypes[name]
            size = (self.capacity, *shape)
            if self.folder is None:
                self.store[name] = torch.empty(size, dtype=dtype, device=self.device)
            else:
                self.folder.mkdir(parents=True, exist_ok=True)
                path = self.folder / f"{name}.bin"
                path.unlink(missing_ok=True)
                self.store[name] = torch.from_file(str(path), shared=True, size=math.prod(size),
                                                   dtype=dtype).view(size)

    def _put(self, keys: torch.Tensor, fields: dict[str, torch.Tensor]) -> None:
        if not self.store:
            self._allocate()
        room = min(self.capacity - self.used, len(keys))
        if room <= 0:
            return
        slots = torch.arange(self.used, self.used + room)
        for name, value in fields.items():
            target = self.store[name]
            target[slots.to(target.device)] = value[:room].to(target.device)
        self.slot_of[keys[:room]] = slots
        self.used += room

    def _get(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: stored[slots.to(stored.device)].to(self.device, non_blocking=True)
                for name, stored in self.store.items()}


def build_trunk_caches(config: Any, model: MoEViT, loaders: dict[tuple[str, ...], Any], device: torch.device,
                       output_dir: Path, process_index: int) -> dict[tuple[str, ...], TrunkCache]:
    """One :class:`TrunkCache` per training loader; the size bound is shared among them by their image counts.

    ``model`` passed :func:`check_cacheable` already (training checks it before it loads any data)."""
    cache = config.trunk_cache
    folder = output_dir / TRUNK_CACHE_FOLDER if cache.location == "disk" else None
    if folder is not None and process_index == 0 and folder.exists():
        shutil.rmtree(folder)  # a cache is only valid for the run (and weights) that wrote it
    total = sum(len(loader.dataset) for loader in loaders.values())
    caches = {}
    for key, loader in loaders.items():
        share = int(cache.max_gib * 2 ** 30 * len(loader.dataset) / total)
        where = folder / f"{'+'.join(key)}.rank{process_index}" if folder is not None else None
        caches[key] = TrunkCache(key, len(loader.dataset) * max(cache.views, 1), cache.views, cache.dtype, share,
                                 device, where)
    return caches


def remove_trunk_caches(caches: dict[tuple[str, ...], TrunkCache], process_index: int) -> None:
    """Free the caches at the end of training; ``location: disk`` files go too (no later run can use them)."""
    folders = {cache.folder.parent for cache in caches.values() if cache.folder is not None}
    for cache in caches.values():
        cache.store.clear()
    if process_index == 0:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def describe_trunk_caches(caches: dict[tuple[str, ...], TrunkCache], cache_config: Any) -> str:
    """One line at the end of training: what the caches hold and how often they served a batch's images."""
    stats = [cache.stats() for cache in caches.values()]
    hits, misses = sum(s["hits"] for s in stats), sum(s["misses"] for s in stats)
    stored, images = sum(s["bytes_stored"] for s in stats), sum(s["images_stored"] for s in stats)
    views = f"{cache_config.views} views per image" if cache_config.views else "augmentation off"
    return (f"trunk cache: {images:,} images stored ({stored / 2 ** 20:.1f} MiB {cache_config.dtype}, "
            f"{cache_config.location}, {views}); {hits / max(hits + misses, 1):.0%} of the images read back")
