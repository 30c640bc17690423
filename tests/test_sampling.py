from collections import Counter

import pytest

from moebsr.training.sampling import TaskSampler

SIZES = {"big": 8000, "mid": 2000, "small": 500}


def _frequencies(sampler, steps=20000):
    counts = Counter(task for step in range(steps) for task in sampler.tasks_for_step(step))
    return {task: counts[task] / steps for task in SIZES}


def test_round_robin_cycles_in_order():
    sampler = TaskSampler("round_robin", SIZES)
    assert [sampler.tasks_for_step(s)[0] for s in range(6)] == ["big", "mid", "small"] * 2


def test_proportional_follows_sizes_and_weights():
    frequencies = _frequencies(TaskSampler("proportional", SIZES, seed=1))
    for task, size in SIZES.items():
        assert frequencies[task] == pytest.approx(size / 10500, abs=0.01)
    weighted = _frequencies(TaskSampler("proportional", SIZES, weights={"small": 16.0}, seed=1))
    assert weighted["small"] == pytest.approx(8000 / 18000, abs=0.01)


def test_temperature_flattens_the_distribution():
    frequencies = _frequencies(TaskSampler("temperature", SIZES, temperature=2.0, seed=2))
    roots = {task: size ** 0.5 for task, size in SIZES.items()}
    for task in SIZES:
        assert frequencies[task] == pytest.approx(roots[task] / sum(roots.values()), abs=0.01)
    assert TaskSampler("temperature", SIZES, temperature=1.0).expected_frequencies() == pytest.approx(
        TaskSampler("proportional", SIZES).expected_frequencies())


def test_joint_trains_every_task_of_a_group_together():
    sampler = TaskSampler("joint", SIZES, groups=[["big", "mid"], ["small"]])
    assert [sampler.tasks_for_step(s) for s in range(4)] == [["big", "mid"], ["small"]] * 2
    assert _frequencies(sampler, 1000) == {"big": 0.5, "mid": 0.5, "small": 0.5}


def test_choices_depend_only_on_seed_and_step():
    first, second = TaskSampler("proportional", SIZES, seed=5), TaskSampler("proportional", SIZES, seed=5)
    assert [first.tasks_for_step(s) for s in range(50)] == [second.tasks_for_step(s) for s in range(50)]
    assert [first.tasks_for_step(s) for s in range(300, 310)] == [second.tasks_for_step(s) for s in range(300, 310)]
    other = TaskSampler("proportional", SIZES, seed=6)
    assert [first.tasks_for_step(s) for s in range(50)] != [other.tasks_for_step(s) for s in range(50)]


def test_unknown_mode():
    with pytest.raises(ValueError, match="train.sampler: 'random' is invalid"):
        TaskSampler("random", SIZES)
