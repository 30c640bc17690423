"""Loaders: determinism, exact mid-epoch resume, sharding, batch image ops, and the per-image DataLoader path."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from moebsr.data import BatchLoader, EpochBatchSampler, ImageSpec, TensorImageDataset, build_task_loader
from moebsr.data.batch_ops import augment_batch, to_model_batch
from moebsr.tasks import BatchAugment, Task

SPEC = ImageSpec(image_size=16, in_chans=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))


@pytest.fixture(autouse=True, scope="module")
def isolated_cache(tmp_path_factory):
    saved = os.environ.get("MOEBSR_CACHE")
    os.environ["MOEBSR_CACHE"] = str(tmp_path_factory.mktemp("moebsr_cache"))
    yield
    if saved is None:
        os.environ.pop("MOEBSR_CACHE")
    else:
        os.environ["MOEBSR_CACHE"] = saved


def numbered_task(count: int = 50, augment: BatchAugment = BatchAugment(crop_padding=2, hflip=True)) -> Task:
    """Image i is filled with the value i (so batches reveal which examples they hold), labels i % 4."""
    images = torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 1, 8, 8).clone()
    images[:, :, :, :4] = 255 - images[:, :, :, :4]  # asymmetric, so flips and shifts are visible
    return Task(name="numbered", num_outputs=4, batch_augment=augment,
                dataset_fn=lambda split: TensorImageDataset(images, torch.arange(count) % 4))


def collect(loader, count: int) -> list[dict]:
    return [loader.next_batch() for _ in range(count)]


def same_batches(first: list[dict], second: list[dict]) -> bool:
    return all(torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
               for a, b in zip(first, second, strict=True))


def test_loader_is_deterministic_given_the_seed():
    task = numbered_task()
    first = collect(build_task_loader(task, "train", SPEC, batch_size=8, train=True, seed=1), 9)
    again = collect(build_task_loader(task, "train", SPEC, batch_size=8, train=True, seed=1), 9)
    other = collect(build_task_loader(task, "train", SPEC, batch_size=8, train=True, seed=2), 9)
    assert same_batches(first, again)
    assert not torch.equal(first[0]["labels"], other[0]["labels"])


def test_training_epoch_is_a_permutation_and_evaluation_keeps_order():
    task = numbered_task(augment=BatchAugment())
    loader = build_task_loader(task, "train", ImageSpec(8, 1, (0.0,), (1 / 255,)), batch_size=8, train=True)
    assert len(loader) == 6  # 50 // 8, last short batch dropped
    seen = torch.cat([batch["images"][:, 0, 0, -1] for batch in loader]).round().long()
    assert len(set(seen.tolist())) == 48 and loader.state_dict()["epoch"] == 1
    evaluation = build_task_loader(task, "train", SPEC, batch_size=8, train=False)
    assert len(evaluation) == 7
    batches = list(evaluation)
    assert torch.equal(torch.cat([batch["labels"] for batch in batches]), torch.arange(50) % 4)
    assert torch.equal(torch.cat([batch["indices"] for batch in batches]), torch.arange(50))


@pytest.mark.parametrize("stop_after", [3, 6, 8])  # mid-epoch, at an epoch boundary, inside the second epoch
def test_resume_mid_epoch_reproduces_the_uninterrupted_batches(stop_after):
    task = numbered_task()
    uninterrupted = collect(build_task_loader(task, "train", SPEC, batch_size=8, train=True, seed=4), 12)
    interrupted = build_task_loader(task, "train", SPEC, batch_size=8, train=True, seed=4)
    collect(interrupted, stop_after)
    state = interrupted.state_dict()
    resumed = build_task_loader(task, "train", SPEC, batch_size=8, train=True, seed=4)
    resumed.load_state_dict(state)
    assert same_batches(collect(resumed, 12 - stop_after), uninterrupted[stop_after:])


def test_resume_refuses_another_batch_size():
    task = numbered_task()
    state = build_task_loader(task, "train", SPEC, batch_size=8, train=True).state_dict()
    with pytest.raises(ValueError, match="saved batch_size=8"):
        build_task_loader(task, "train", SPEC, batch_size=4, train=True).load_state_dict(state)


@pytest.mark.parametrize("drop_last", [False, True])
def test_shards_are_disjoint_equal_and_cover_the_data(drop_last):
    shards = [EpochBatchSampler(50, 4, shuffle=True, seed=0, drop_last=drop_last, process_index=p, num_processes=3)
              for p in range(3)]
    assert len({len(s) for s in shards}) == 1
    indices = [torch.cat([batch for _, batch in s.batches(epoch=2)]) for s in shards]
    together = torch.cat(indices)
    if drop_last:
        assert len(set(together.tolist())) == len(together) == 48
    else:
        assert set(together.tolist()) == set(range(50)) and len(together) == 51  # one wrapped-around example


def test_sharded_loaders_split_the_batches():
    task = numbered_task(augment=BatchAugment())
    spec = ImageSpec(8, 1, (0.0,), (1 / 255,))
    values = []
    for process in range(2):
        loader = build_task_loader(task, "train", spec, batch_size=5, train=True, process_index=process,
                                   num_processes=2)
        values.append(torch.cat([b["images"][:, 0, 0, -1] for b in loader]).round().long())
    assert len(values[0]) == len(values[1]) == 25 and not set(values[0].tolist()) & set(values[1].tolist())
    evaluation = [build_task_loader(task, "test", spec, batch_size=8, train=False, process_index=p, num_processes=3)
                  for p in range(3)]
    indices = torch.cat([batch["indices"] for loader in evaluation for batch in loader])
    assert len(indices) == 51 and set(indices.tolist()) == set(range(50))  # one repeat, found by its index


def test_to_model_batch_repeats_grey_resizes_and_normalises():
    grey = torch.full((2, 1, 7, 7), 255, dtype=torch.uint8)
    out = to_model_batch(grey, SPEC)
    assert out.shape == (2, 3, 16, 16)
    expected = torch.tensor([(1 - 0.5) / 0.2, (1 - 0.4) / 0.25, (1 - 0.3) / 0.5]).view(1, 3, 1, 1)
    assert torch.allclose(out, expected.expand_as(out), atol=1e-5)
    colour = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    colour[:, 1] = 255  # pure green -> luma 0.587
    one_channel = to_model_batch(colour, ImageSpec(8, 1, (0.0,), (1.0,)))
    assert one_channel.shape == (1, 1, 8, 8) and torch.allclose(one_channel, torch.full_like(one_channel, 0.587))


def test_augment_batch_shifts_and_flips_each_image():
    images = torch.randint(0, 256, (32, 1, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    shifted = augment_batch(images, BatchAugment(crop_padding=2), torch.arange(len(images)) * 7919)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for index in range(32):  # each output is some 6x6 window of its padded input
        windows = padded[index, 0].unfold(0, 6, 1).unfold(1, 6, 1).reshape(-1, 6, 6)
        assert (windows == shifted[index, 0]).all(-1).all(-1).any()
    assert not torch.equal(shifted, images)
    flipped = augment_batch(images, BatchAugment(hflip=True), torch.arange(len(images)) * 7919)
    mirrored = [torch.equal(flipped[i], images[i].flip(-1)) for i in range(32)]
    kept = [torch.equal(flipped[i], images[i]) for i in range(32)]
    assert all(m or k for m, k in zip(mirrored, kept)) and 4 < sum(mirrored) < 28


def picture_task(count: int = 12) -> Task:
    """Colour and grey PIL images of mixed sizes: the per-image path (as for hub datasets)."""
    rng = np.random.default_rng(0)
    pairs = [(Image.fromarray(rng.integers(0, 256, (10 + i, 12, 3) if i % 2 else (9, 9 + i), dtype=np.uint8)), i % 3)
             for i in range(count)]
    return Task(name="pictures", num_outputs=3, dataset_fn=lambda split: pairs)


def test_item_path_is_deterministic_across_worker_counts_and_resumes():
    task = picture_task()
    spec = ImageSpec(24, 3)
    in_process = collect(build_task_loader(task, "train", spec, batch_size=4, train=True, seed=0), 5)
    with_workers = collect(build_task_loader(task, "train", spec, batch_size=4, train=True, seed=0, num_workers=2), 5)
    assert in_process[0]["images"].shape == (4, 3, 24, 24)
    assert same_batches(in_process, with_workers)
    resumed = build_task_loader(task, "train", spec, batch_size=4, train=True, seed=0)
    resumed.load_state_dict({"epoch": 0, "position": 2})
    assert same_batches(collect(resumed, 3), in_process[2:])
    before = torch.get_rng_state()
    collect(build_task_loader(task, "train", spec, batch_size=4, train=True, seed=0), 1)
    assert torch.equal(before, torch.get_rng_state())  # seeding per image leaves the caller's RNG alone


def test_item_path_uses_a_task_transform():
    calls = []

    def factory(spec: ImageSpec, train: bool):
        calls.append(train)
        return lambda image: torch.zeros(spec.in_chans, spec.image_size, spec.image_size)

    task = picture_task()
    task.eval_transform = factory
    batch = next(iter(build_task_loader(task, "test", ImageSpec(5, 1, (0.5,), (0.5,)), batch_size=3, train=False)))
    assert calls == [False] and torch.equal(batch["images"], torch.zeros(3, 1, 5, 5))


def test_batch_loader_accepts_the_models_image_spec_dict():
    task = numbered_task()
    spec = {"image_size": 12, "in_chans": 3, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    loader = build_task_loader(task, "train", spec, batch_size=8, train=True)
    assert isinstance(loader, BatchLoader) and loader.next_batch()["images"].shape == (8, 3, 12, 12)
