"""Which task(s) each training step trains: round robin, proportional, temperature, or joint batches.

A step's choice is a pure function of ``(seed, step)``, so resuming needs nothing but the step count and
every process of a distributed run picks the same task without communicating.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

SAMPLER_MODES = ("round_robin", "proportional", "temperature", "joint")


class TaskSampler:
    """Picks the tasks of step ``n``.

    Args:
        mode: ``round_robin`` cycles tasks in order; ``proportional`` draws a task with p ~ n_i * w_i;
            ``temperature`` draws with p ~ n_i^(1/T) * w_i; ``joint`` cycles over groups of tasks that label
            the same images (a task without partners is a group of one), and trains a whole group on one batch.
        sizes: Training examples per task (n_i).
        weights: Sampling weights per task (w_i, default 1).
        groups: For ``joint``: lists of task names that share a dataset.
    """

    def __init__(
            self,
            mode: str,
            sizes: Mapping[str, int],
            weights: Optional[Mapping[str, float]] = None,
            groups: Optional[Sequence[Sequence[str]]] = None,
            temperature: float = 2.0,
            seed: int = 0,
    ) -> None:
        if mode not in SAMPLER_MODES:
            raise ValueError(f"train.sampler: {mode!r} is invalid; accepted: {', '.join(SAMPLER_MODES)}")
        self.mode = mode
        self.tasks = list(sizes)
        self.seed = seed
        weights = weights or {}
        sizes_array = np.array([float(sizes[t]) for t in self.tasks])
        weight_array = np.array([float(weights.get(t, 1.0)) for t in self.tasks])
        if mode == "temperature":
            sizes_array = sizes_array ** (1.0 / temperature)
        scores = sizes_array * weight_array
        self.probabilities = scores / scores.sum()
        self.groups = [list(group) for group in groups] if groups else [[task] for task in self.tasks]

    def tasks_for_step(self, step: int) -> list[str]:
        if self.mode == "round_robin":
            return [self.tasks[step % len(self.tasks)]]
        if self.mode == "joint":
            return list(self.groups[step % len(self.groups)])
        rng = np.random.default_rng([self.seed, step])
        return [self.tasks[int(rng.choice(len(self.tasks), p=self.probabilities))]]

    def step_task_sets(self) -> list[list[str]]:
        """Every set of tasks a step can train: each group (``joint``), else each task alone."""
        return [list(group) for group in self.groups] if self.mode == "joint" else [[task] for task in self.tasks]

    def expected_frequencies(self) -> dict[str, float]:
        """Long-run share of steps that train each task."""
        if self.mode == "round_robin":
            return {task: 1.0 / len(self.tasks) for task in self.tasks}
        if self.mode == "joint":
            return {task: sum(task in g for g in self.groups) / len(self.groups) for task in self.tasks}
        return dict(zip(self.tasks, self.probabilities.tolist()))
