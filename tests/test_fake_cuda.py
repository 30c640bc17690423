"""Device safety on a fake CUDA device (tests/fake_cuda.py): the model's training step, the batch ops and the loader's
device path run with tensors that report ``cuda:0``; a CPU tensor meeting them fails as on a GPU, and every read back
to the host is counted."""

import collections

import pytest
import torch
from fake_cuda import FakeCudaTensor, fake_cuda
from tiny_models import distinct_experts, images, tiny_moevit

from moebsr.data import build_task_loader
from moebsr.data.image_spec import ImageSpec


def test_fake_cuda_refuses_what_cuda_refuses_and_counts_host_reads():
    with fake_cuda() as cuda:
        x = torch.arange(6.0).to("cuda")
        assert isinstance(x, FakeCudaTensor) and x.device == torch.device("cuda", 0) and x.is_cuda
        assert isinstance(torch.zeros(3, device=x.device), FakeCudaTensor)  # a factory given the device
        assert isinstance(x + torch.tensor(2.0), FakeCudaTensor)  # a CPU scalar in an elementwise op: allowed
        assert isinstance(x[torch.tensor([0, 2])], FakeCudaTensor)  # CPU indices: CUDA copies them over
        for mixed in (lambda: x + torch.ones(6), lambda: torch.cat([x, torch.ones(2)]),
                      lambda: torch.stack([x[0], torch.tensor(1.0)]), lambda: torch.ones(6)[x.long()]):
            with pytest.raises(RuntimeError, match="same device"):
                mixed()
        assert not cuda.host_reads  # nothing above read the device
        back = (x * 2).cpu()
        assert type(back) is torch.Tensor and back.device.type == "cpu" and torch.equal(back, torch.arange(6.0) * 2)
        assert x.sum().item() == 15.0 and x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and bool(x[1] > 0)
        assert torch.equal(x[x > 2].cpu(), torch.tensor([3.0, 4.0, 5.0]))
    assert cuda.host_reads == collections.Counter(copy_to_cpu=2, item=2, tolist=1, boolean_mask_index=1)


def _step(model, batch, optimizer):
    outputs = model(batch, ["a", "b"])
    loss = sum(output.float().square().mean() for output in outputs.values()) + model.aux_loss()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _model(dispatch: str = "grouped"):
    return distinct_experts(tiny_moevit(token_drop=dict(keep_rate=0.5),
                                        moe=dict(num_experts=4, top_k=2, capacity_factor=1.0, dispatch=dispatch)))


@pytest.mark.parametrize("dispatch", ["grouped", "padded"])
def test_a_training_step_on_fake_cuda_matches_cpu_and_reads_the_host_only_for_the_grouped_counts(dispatch):
    """Forward, loss, backward and an AdamW step with parameters and batch on the fake device: the same numbers as
    on the CPU; the grouped dispatch reads its per-expert counts once per MoE layer, the padded one nothing."""
    reference = _model(dispatch).train()
    reference_loss = _step(reference, images(), torch.optim.AdamW(reference.parameters(), lr=1e-2))
    model = _model(dispatch).train()
    with fake_cuda() as cuda:
        model.to("cuda")
        assert all(isinstance(p, FakeCudaTensor) and isinstance(p, torch.nn.Parameter) for p in model.parameters())
        loss = _step(model, images().to("cuda"), torch.optim.AdamW(model.parameters(), lr=1e-2))
        reads = collections.Counter(cuda.host_reads)
        assert isinstance(loss, FakeCudaTensor) and torch.equal(loss.cpu(), reference_loss)
        for (name, moved), (_, kept) in zip(model.named_parameters(), reference.named_parameters()):
            assert isinstance(moved, FakeCudaTensor) and torch.equal(moved.cpu(), kept), name
    expected = {"grouped": collections.Counter(tolist=len(model.moe_blocks)), "padded": collections.Counter()}
    assert reads == expected[dispatch], reads


def test_fake_cuda_catches_a_tensor_made_without_device_in_the_dispatch():
    import moebsr.model.dispatch as dispatch
    original = dispatch.torch.arange  # planted bug: an index made without device=
    model = _model().train()
    with fake_cuda():
        model.to("cuda")
        batch = images().to("cuda")
        try:
            dispatch.torch.arange = lambda *args, **kwargs: original(*args, **{k: v for k, v in kwargs.items()
                                                                                if k != "device"})
            with pytest.raises(RuntimeError, match="same device"):
                model(batch, ["a", "b"])
        finally:
            dispatch.torch.arange = original
        model(batch, ["a", "b"])  # and without the bug it runs


def test_packaged_batches_are_pinned_copied_and_augmented_on_the_fake_device(monkeypatch):
    from moebsr.tasks import create_task
    spec = ImageSpec(image_size=28, in_chans=3)
    task = create_task("digits")
    cpu_loader = build_task_loader(task, "train", spec, batch_size=8, train=True)
    on_cpu = [cpu_loader.next_batch() for _ in range(2)]
    with fake_cuda() as cuda:
        loader = build_task_loader(task, "train", spec, batch_size=8, train=True, device="cuda")
        on_device = [loader.next_batch() for _ in range(2)]
        assert all(isinstance(batch["images"], FakeCudaTensor) for batch in on_device)
        assert all(torch.equal(a["images"].cpu(), b["images"]) for a, b in zip(on_device, on_cpu))
        # per batch: the uint8 images and the per-image augmentation seeds, pinned, asynchronous
        assert cuda.copies_to_device == cuda.pinned_copies_to_device == 4 and cuda.synchronous_copies_to_device == 0
        assert cuda.host_reads == collections.Counter(copy_to_cpu=2)  # only the comparison's .cpu() above

        import moebsr.data.batch_ops as batch_ops
        draw = batch_ops._draw  # planted bug: the per-image draws made on the CPU beside device images
        monkeypatch.setattr(batch_ops, "_draw", lambda seeds, salt: draw(seeds.cpu(), salt))
        with pytest.raises(RuntimeError, match="same device"):
            loader.next_batch()


def test_trunk_cache_and_bf16_frozen_weights_on_fake_cuda_match_cpu_and_read_nothing_back():
    """The trunk cache keeps its lookup table on the host (the loader's indices live there) and its entries on the
    device; frozen weights in bf16 cast on the device. Neither reads the device back nor mixes devices."""
    from moebsr.model.frozen_storage import store_frozen_weights
    from moebsr.training.trunk_cache import TrunkCache

    def build():
        model = distinct_experts(tiny_moevit(moe=dict(blocks=[1, 3], num_experts=4, top_k=2, capacity_factor=1.0,
                                                      dispatch="padded"),
                                             bsr=dict(preset="last_k", last_k=2), token_drop=dict(keep_rate=0.5)))
        store_frozen_weights(model, "bf16")
        return model.train()

    data, batches = images(10), [torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 4, 5])]  # a miss, then half hits
    reference, reference_cache = build(), TrunkCache(["a", "b"], 10, 0, "bf16", 10 ** 9, torch.device("cpu"))
    expected = [reference_cache.forward(reference, reference, data[b], b, view=0)["a"] for b in batches]
    model = build()
    with fake_cuda() as cuda:
        model.to("cuda")
        cache = TrunkCache(["a", "b"], 10, 0, "bf16", 10 ** 9, torch.device("cuda", 0))
        outputs = [cache.forward(model, model, data[b].to("cuda"), b, view=0)["a"] for b in batches]
        assert isinstance(cache.store["tokens"], FakeCudaTensor)
        reads = collections.Counter(cuda.host_reads)
    assert not reads, reads
    for output, reference_output in zip(outputs, expected):
        assert torch.equal(output.cpu(), reference_output)
