"""Opt-in GPU smoke tests (``MOEBSR_TEST_GPU=1 pytest -m gpu``): the same step on CUDA as on CPU, within tolerances
(CUDA kernels are not bit-identical to CPU ones), in bf16 and fp16, with both MoE backends."""

import pytest
import torch

from moebsr.profiling import autocast
from tiny_models import distinct_experts, images, tiny_moevit

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
    cpu_loss.backward()
    cuda_loss.backward()
    tolerance = 1e-4 if precision == "no" else 5e-2
    assert cuda_loss.item() == pytest.approx(cpu_loss.item(), rel=tolerance)
    for (name, a), (_, b) in zip(cpu.named_parameters(), cuda.named_parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad.float().cpu(), atol=tolerance, rtol=tolerance * 10), name
