"""Device-safe code, checked on CPU: tensors follow the device of the tensors they meet, and the training step
reads nothing back from the device that it does not need."""

import collections

import torch
from tiny_models import distinct_experts, images, tiny_moevit
from torch.utils._python_dispatch import TorchDispatchMode

from moebsr.data.batch_ops import augment_batch, to_model_batch
from moebsr.data.image_spec import ImageSpec
from moebsr.tasks.spec import BatchAugment


class ScalarReads(TorchDispatchMode):
    """Counts ``.item()`` / ``bool()`` / ``float()`` of tensors: each one waits for the device (a host sync)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count[func] += 1
        return func(*args, **(kwargs or {}))


def test_batch_augmentation_and_conversion_run_on_the_images_device():
    """A meta tensor stands in for a CUDA one: an index or draw made on the CPU beside it fails, as on a GPU."""
    on_device = torch.zeros(4, 3, 8, 8, dtype=torch.uint8, device="meta")
    seeds = torch.arange(4)  # the sampler's per-example seeds come from the CPU
    augmented = augment_batch(on_device, BatchAugment(crop_padding=2, hflip=True), seeds)
    assert augmented.device.type == "meta" and augmented.shape == (4, 3, 8, 8)
    grey = ImageSpec(image_size=16, in_chans=1, mean=(0.5,), std=(0.5,))
    batch = to_model_batch(augmented, grey, device=torch.device("meta"))
    assert batch.device.type == "meta" and batch.shape == (4, 1, 16, 16)
    cpu = torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8)
    expected = augment_batch(cpu, BatchAugment(crop_padding=2, hflip=True), seeds)
    assert torch.equal(augment_batch(cpu, BatchAugment(crop_padding=2, hflip=True), seeds.clone()), expected)


def test_a_training_forward_and_backward_reads_no_scalar_from_the_device():
    """The grouped dispatch needs its per-expert counts (one list read per MoE layer); nothing else is read
    back: no ``bool()`` of a mask, no ``.item()`` of a loss, in the model's forward and backward."""
    model = distinct_experts(tiny_moevit(token_drop=dict(keep_rate=0.5), moe=dict(num_experts=4, top_k=2,
                                                                                  capacity_factor=0.5)))
    model.train()
    with ScalarReads() as reads:
        outputs = model(images(), ["a", "b"])
        (sum(output.float().square().mean() for output in outputs.values()) + model.aux_loss()).backward()
    assert sum(reads.count.values()) == 0, reads.count


def test_routing_is_fp32_under_bf16_autocast():
    """bf16 gate logits round near-ties differently; the router computes them in fp32 with autocast off."""
    from moebsr.model.routing import TaskRouter
    torch.manual_seed(0)
    router = TaskRouter(dim=64, num_experts=16, top_k=4, tasks=["a"])
    tokens = torch.randn(4096, 64)
    plain = router(tokens, "a")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = router(tokens, "a")
    assert torch.equal(autocast.probabilities, plain.probabilities) and autocast.probabilities.dtype == torch.float32
    assert torch.equal(autocast.expert_index, plain.expert_index)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what a bf16 gate would have chosen: not always the same
        bf16_index = router.gates["a"](tokens).float().topk(4, dim=-1).indices
    assert not torch.equal(bf16_index, plain.expert_index)


# Token dropping off: its top-k of CLS attention computed from bf16/fp16 q and k keeps other tokens than fp32 does on
# near-ties (measured here: losses 2-3 % apart, gradient cosine 0.978), as in any mixed-precision EViT; this test is
# about the continuous path. (Routing is in fp32 with autocast off: test_routing_is_fp32_under_bf16_autocast.)
DROPPING = None


def test_bf16_and_fp16_autocast_forward_and_backward_on_cpu_stay_close_to_fp32():
    from moebsr.analysis.profiling import autocast
    batch, results = images(8), {}
    for precision in ("no", "bf16", "fp16"):
        model = distinct_experts(tiny_moevit(token_drop=DROPPING))
        model.train()
        with autocast(precision, batch.device):
            outputs = model(batch, ["a", "b"])
        loss = sum(output.float().square().mean() for output in outputs.values()) + model.aux_loss().float()
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        assert torch.isfinite(loss) and torch.isfinite(grads).all(), precision
        results[precision] = (loss.item(), grads)
    reference_loss, reference_grads = results["no"]
    for precision in ("bf16", "fp16"):
        loss, grads = results[precision]
        assert abs(loss - reference_loss) <= 0.005 * abs(reference_loss), precision
        similarity = torch.nn.functional.cosine_similarity(grads, reference_grads, dim=0).item()
        assert similarity > 0.999, precision  # measured: bf16 0.9996, fp16 1.0000


def test_fp16_with_sharded_experts_is_refused_in_one_line():
    import pytest

    from moebsr.config import ConfigError
    from moebsr.training.expert_parallel import check_precision_with_sharding
    with pytest.raises(ConfigError, match=r"^train.mixed_precision: 'fp16' with experts sharded over 2 processes "
                                          r"\(moe.backend=tutel\) .*; accepted: bf16 or no$"):
        check_precision_with_sharding("fp16", ["blocks.3.mlp.experts.fc1_weight"], 2)
    check_precision_with_sharding("bf16", ["blocks.3.mlp.experts.fc1_weight"], 2)
    check_precision_with_sharding("fp16", [], 2)  # replicated experts: DDP all-reduces every gradient


def test_packaged_batches_are_augmented_resized_and_normalised_on_the_loaders_device():
    from moebsr.data import build_task_loader
    from moebsr.tasks import create_task
    spec = ImageSpec(image_size=28, in_chans=3)
    task = create_task("digits")
    on_device = build_task_loader(task, "train", spec, batch_size=8, train=True, device="meta").next_batch()
    on_cpu = build_task_loader(task, "train", spec, batch_size=8, train=True).next_batch()
    assert on_device["images"].device.type == "meta" and on_device["images"].shape == on_cpu["images"].shape
    assert torch.equal(on_device["indices"], on_cpu["indices"])  # the same batch, only where its work ran


def _training_step_under_meta_default_device(model, batch):
    """Forward, loss and backward with factory functions defaulting to the meta device: a tensor made without
    ``device=`` is then a meta tensor, and meeting the model's CPU tensors fails as a CPU tensor meeting CUDA
    ones would on a GPU."""
    model.train()
    with torch.device("meta"):
        outputs = model(batch, ["a", "b"])
        loss = sum(output.float().square().mean() for output in outputs.values()) + model.aux_loss()
        loss.backward()
    return loss


def test_model_loss_and_backward_create_every_tensor_on_the_device_of_the_tensors_they_meet():
    import pytest
    for decision in ("shared", "per_task"):
        model = distinct_experts(tiny_moevit(token_drop=dict(keep_rate=0.5, decision=decision),
                                             moe=dict(num_experts=4, top_k=2, capacity_factor=1.0)))
        assert _training_step_under_meta_default_device(model, images()).device.type == "cpu"

    import moebsr.model.dispatch as dispatch  # the check catches a planted bug: an index made without device=
    original = dispatch.torch.arange
    try:
        dispatch.torch.arange = lambda *args, **kwargs: original(*args, **{k: v for k, v in kwargs.items()
                                                                            if k != "device"})
        with pytest.raises(RuntimeError, match=r"(same|expected) device"):
            _training_step_under_meta_default_device(distinct_experts(tiny_moevit()), images())
    finally:
        dispatch.torch.arange = original
