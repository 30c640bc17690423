"""Opt-in GPU smoke tests (``MOEBSR_TEST_GPU=1 pytest -m gpu``): the same step on CUDA as on CPU, within tolerances
(CUDA kernels are not bit-identical to CPU ones), in bf16 and fp16; tutel against the torch backend on CUDA; two GPUs
over NCCL against one (skipped on a host with fewer)."""

import pytest
import torch
from tiny_models import distinct_experts, images, tiny_moevit

from moebsr.analysis.profiling import autocast

pytestmark = pytest.mark.gpu


def _loss(model, batch, precision):
    with autocast(precision, batch.device):
        outputs = model(batch, ["a", "b"])
        return sum(output.float().square().mean() for output in outputs.values()) + model.aux_loss()


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_one_step_on_cuda_matches_cpu(precision):
    cpu = distinct_experts(tiny_moevit(token_drop=dict(keep_rate=0.5)))
    cuda = distinct_experts(tiny_moevit(token_drop=dict(keep_rate=0.5))).cuda()
    batch = images(8)
    cpu_loss, cuda_loss = _loss(cpu, batch, "no"), _loss(cuda, batch.cuda(), precision)
    _assert_same_step(cpu, cpu_loss, cuda, cuda_loss, 1e-4 if precision == "no" else 5e-2)


def _assert_same_step(reference, reference_loss, candidate, candidate_loss, tolerance: float) -> None:
    """Equal losses and gradients within ``tolerance`` (relative, and absolute for the gradients)."""
    reference_loss.backward()
    candidate_loss.backward()
    assert candidate_loss.item() == pytest.approx(reference_loss.item(), rel=tolerance)
    for (name, a), (_, b) in zip(reference.named_parameters(), candidate.named_parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad.float().cpu(), b.grad.float().cpu(), atol=tolerance, rtol=tolerance * 10), name


def _needs_gpus(count: int) -> None:
    if torch.cuda.device_count() < count:
        pytest.skip(f"needs {count} CUDA devices, this host has {torch.cuda.device_count()}")


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_tutel_on_cuda_matches_the_torch_backend_on_cuda(precision):
    pytest.importorskip("tutel", reason="tutel is not installed (not on PyPI): see docs/expert-parallel.md")
    reference = distinct_experts(tiny_moevit(moe=dict(num_experts=4, top_k=2))).cuda()
    candidate = tiny_moevit(moe=dict(num_experts=4, top_k=2, backend="tutel")).cuda()
    candidate.load_state_dict(reference.state_dict())
    batch = images(8).cuda()
    reference_loss, candidate_loss = _loss(reference, batch, precision), _loss(candidate, batch, precision)
    _assert_same_step(reference, reference_loss, candidate, candidate_loss, 1e-4 if precision == "no" else 5e-2)


def test_two_gpus_over_nccl_train_like_one_gpu_with_the_same_global_batch(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on two GPUs (NCCL) against one GPU, 6 steps."""
    _needs_gpus(2)
    from run_helpers import launch_run
    from safetensors.torch import load_file
    same = ["token_drop.enabled=false", "logging.trackers=[none]", "train.lr=2e-3", "train.checkpoint_every=0"]
    one, two = tmp_path / "gpu1", tmp_path / "gpu2"
    launch_run(one, 1, 6, same + ["train.batch_size=16"])
    launch_run(two, 2, 6, same + ["train.batch_size=8"])
    first, second = (load_file(str(run / "model.safetensors")) for run in (one, two))
    gap = max((value - second[key]).abs().max().item() for key, value in first.items())
    assert gap < 1e-3, f"two GPUs differ from one by {gap:.2e} after 6 steps"
