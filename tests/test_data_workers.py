"""The per-image loader keeps its DataLoader and its worker processes across epochs, with the batches it had."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moebsr.data import ImageSpec, build_task_loader
from moebsr.data.transforms import default_transform
from moebsr.tasks import Task


class PidRecordingTransform:
    """The default transform, also writing the id of the process that ran it (a worker) to ``log``."""

    def __init__(self, log: Path, spec: ImageSpec, train: bool) -> None:
        self.log, self.transform = log, default_transform(spec, train)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        with open(self.log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        return self.transform(image)


def picture_task(log: Path) -> Task:
    rng = np.random.default_rng(0)
    pairs = [(Image.fromarray(rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)), i % 3) for i in range(12)]
    task = Task(name="pictures", num_outputs=3, dataset_fn=lambda split: pairs)
    task.train_transform = functools.partial(PidRecordingTransform, log)
    return task


def test_the_same_worker_processes_serve_every_epoch_with_the_in_process_batches(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEBSR_CACHE", str(tmp_path / "cache"))
    log = tmp_path / "pids.txt"
    spec = ImageSpec(24, 3)
    in_process = build_task_loader(picture_task(log), "train", spec, batch_size=4, train=True, seed=3)
    expected = [in_process.next_batch() for _ in range(2 * len(in_process))]
    log.unlink()
    loader = build_task_loader(picture_task(log), "train", spec, batch_size=4, train=True, seed=3, num_workers=2)
    epochs, served = [], []
    for _ in range(2):
        epochs.append([loader.next_batch() for _ in range(len(loader))])
        served.append(set(log.read_text().split()))
        log.unlink()
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == len(loader)
    assert len(served[0]) == 2 and served[0] == served[1] and str(os.getpid()) not in served[0]
    for got, want in zip(epochs[0] + epochs[1], expected, strict=True):
        assert torch.equal(got["images"], want["images"]) and torch.equal(got["labels"], want["labels"])
    assert not torch.equal(epochs[0][0]["indices"], epochs[1][0]["indices"])  # a new order in the second epoch


def test_closing_a_loader_with_batches_in_flight_stops_its_workers_at_once(tmp_path, monkeypatch):
    """Left to the garbage collector, a loader whose workers still hold prefetched batches stalls ~10 s in their
    joins; ``close()`` (evaluation does it after every pass, training at its end) shuts them down at once."""
    import time

    monkeypatch.setenv("MOEBSR_CACHE", str(tmp_path / "cache"))
    loader = build_task_loader(picture_task(tmp_path / "pids.txt"), "train", ImageSpec(24, 3), batch_size=2,
                               train=True, num_workers=2)
    loader.next_batch()  # the workers now prefetch the next batches
    workers = loader._item_loader._iterator._workers
    started = time.perf_counter()
    loader.close()
    assert time.perf_counter() - started < 3.0
    assert not any(worker.is_alive() for worker in workers)
    assert len(loader.next_batch()["images"]) == 2  # a closed loader starts new workers when asked again


@pytest.mark.timeout(120)
def test_a_stop_signal_to_the_whole_process_group_leaves_the_workers_serving(tmp_path, monkeypatch):
    """A preemption signals every process of the job, loader workers included: they ignore it (the training process
    finishes its step, saves and stops them), instead of dying and making torch raise "DataLoader worker ... is
    killed by signal" inside the training process, mid-save."""
    import signal
    import time

    monkeypatch.setenv("MOEBSR_CACHE", str(tmp_path / "cache"))
    log = tmp_path / "pids.txt"
    spec = ImageSpec(24, 3)
    expected = build_task_loader(picture_task(log), "train", spec, batch_size=2, train=True, seed=1)
    expected = [expected.next_batch() for _ in range(6)]
    loader = build_task_loader(picture_task(log), "train", spec, batch_size=2, train=True, seed=1, num_workers=2)
    got = [loader.next_batch(), loader.next_batch()]
    while len(set(log.read_text().split())) < 2:  # both workers are past their start (and its worker_init_fn)
        time.sleep(0.01)
    workers = loader._item_loader._iterator._workers
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGINT)
    time.sleep(0.5)
    assert all(worker.is_alive() for worker in workers)
    got += [loader.next_batch() for _ in range(4)]
    for batch, want in zip(got, expected, strict=True):
        assert torch.equal(batch["images"], want["images"]) and torch.equal(batch["labels"], want["labels"])
    loader.close()
    assert not any(worker.is_alive() for worker in workers)


def test_a_loader_dropped_without_close_stops_its_workers_when_collected(tmp_path, monkeypatch):
    """A dropped loader is collected as a reference cycle, where torch's own shutdown finds its queues already gone and
    falls back on SIGTERM, which the workers ignore: moebsr stops them first, while the queues still work."""
    import gc
    import time

    monkeypatch.setenv("MOEBSR_CACHE", str(tmp_path / "cache"))
    loader = build_task_loader(picture_task(tmp_path / "pids.txt"), "train", ImageSpec(24, 3), batch_size=2,
                               train=True, num_workers=2)
    loader.next_batch()
    workers = loader._item_loader._iterator._workers
    del loader
    started = time.perf_counter()
    gc.collect()
    assert time.perf_counter() - started < 3.0 and not any(worker.is_alive() for worker in workers)


def test_a_process_that_never_closed_its_loader_still_exits_promptly(tmp_path):
    """Workers that ignore SIGTERM would hang multiprocessing's exit handler (SIGTERM, then a join without a time
    limit) in a process that left a loader open: moebsr closes such loaders at exit."""
    import subprocess
    import sys
    import textwrap
    import time

    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from moebsr.data import ImageSpec, build_task_loader
        from test_data_workers import picture_task
        loader = build_task_loader(picture_task({str(tmp_path / "pids.txt")!r}), "train", ImageSpec(24, 3),
                                   batch_size=2, train=True, num_workers=2)
        loader.next_batch()
        KEEP = loader  # still referenced at exit, workers prefetching
        print("fetched", flush=True)
    """)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MOEBSR_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0 and "fetched" in result.stdout, result.stderr[-2000:]
    assert time.perf_counter() - started < 60
