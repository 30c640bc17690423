"""The default suite runs on CPU, on any host: its bit-exact checks assume CPU determinism, and its multi-process
runs are gloo processes (``--multi_gpu`` on a 1-GPU host would send rank 1 to ``cuda:1``). CUDA is hidden from
the tests and every process they start, unless ``MOEBSR_TEST_GPU=1`` asks for the ``gpu``-marked smoke tests
(``MOEBSR_TEST_GPU=1 pytest -m gpu``), which compare CUDA with CPU within tolerances."""

import os

import pytest

GPU_REQUESTED = os.environ.get("MOEBSR_TEST_GPU") == "1"
if not GPU_REQUESTED:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA (that happens lazily)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU and MOEBSR_TEST_GPU=1 (off by default)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch
    reason = ("set MOEBSR_TEST_GPU=1 to run GPU tests" if not GPU_REQUESTED else
              "no CUDA device" if not torch.cuda.is_available() else None)
    for item in items:
        if "gpu" in item.keywords and reason:
            item.add_marker(pytest.mark.skip(reason=reason))
