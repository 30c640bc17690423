"""Seeded, resumable, shardable batch order: which example indices make batch ``b`` of epoch ``e`` on process ``p``.

The order of an epoch is a pure function of ``(seed, epoch)``, so resuming needs only ``(epoch, position)`` and
every process agrees on the permutation without communicating; process ``p`` of ``P`` takes every ``P``-th index.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch


class EpochBatchSampler:
    """Batches of indices into a dataset of ``num_examples``.

    Args:
        shuffle: A new permutation per epoch; False keeps dataset order (evaluation).
        drop_last: Drop the last short batch (training keeps batch shapes constant). Without it, shards are padded
            by wrapping around so all processes get the same number of batches (DDP needs that).
        process_index / num_processes: This process's shard.
    """

    def __init__(self, num_examples: int, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False,
                 process_index: int = 0, num_processes: int = 1) -> None:
        if batch_size < 1 or num_examples < 1:
            raise ValueError(f"batch_size={batch_size}, num_examples={num_examples}; both must be >= 1")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index={process_index} is outside num_processes={num_processes}")
        self.num_examples, self.batch_size, self.shuffle, self.seed = num_examples, batch_size, shuffle, seed
        self.drop_last, self.process_index, self.num_processes = drop_last, process_index, num_processes
        if drop_last:
            self.shard_size = num_examples // num_processes
        else:
            self.shard_size = math.ceil(num_examples / num_processes)
        if len(self) == 0:
            raise ValueError(f"{num_examples} examples over {num_processes} process(es) give no batch of "
                             f"{batch_size} with drop_last=True; lower the batch size")

    def __len__(self) -> int:
        """Batches per epoch on this process."""
        if self.drop_last:
            return self.shard_size // self.batch_size
        return math.ceil(self.shard_size / self.batch_size)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This process's indices for ``epoch``, in order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        else:
            order = np.arange(self.num_examples)
        total = self.shard_size * self.num_processes
        if total > self.num_examples:  # pad by wrapping around
            order = np.resize(order, total)
        return torch.from_numpy(order[:total][self.process_index::self.num_processes].copy())

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """``(batch_number, indices)`` for batches ``start, start+1, ...`` of ``epoch``."""
        indices = self.epoch_indices(epoch)
        for number in range(start, len(self)):
            yield number, indices[number * self.batch_size:(number + 1) * self.batch_size]

    def example_seeds(self, epoch: int, indices: torch.Tensor) -> torch.Tensor:
        """One seed per example, a pure function of ``(seed, epoch, example index)``: an example gets the same
        augmentation whichever batch or process it lands in, so P processes with batch B train exactly like one
        process with batch B*P, and a resumed run like an uninterrupted one."""
        return mix64(indices.to(torch.int64) + mix64(torch.tensor([self.seed * 1_000_003 + epoch], dtype=torch.int64)))


_MASKS = {shift: (1 << (64 - shift)) - 1 for shift in (27, 30, 31)}


def _to_signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = (_to_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def mix64(values: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (wrapping arithmetic; logical shifts via masks): well-spread
    pseudo-random 64-bit values from consecutive integers, vectorised."""
    x = values.to(torch.int64) + _GOLDEN
    x = (x ^ ((x >> 30) & _MASKS[30])) * _MIX1
    x = (x ^ ((x >> 27) & _MASKS[27])) * _MIX2
    return x ^ ((x >> 31) & _MASKS[31])
