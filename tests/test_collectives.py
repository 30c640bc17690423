"""Every collective the package calls gets device tensors, as NCCL requires: each call site runs in a simulated NCCL
job of 2 processes (tests/fake_nccl.py) with its tensors on the fake CUDA device (tests/fake_cuda.py), where a CPU
tensor reaching a collective fails as it would on GPUs."""

import collections
import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from fake_cuda import FakeCudaTensor, fake_cuda
from fake_nccl import nccl_world
from tiny_models import distinct_experts, images, tiny_moevit

from moebsr.model.tutel_backend import SHARD_ATTR, ExpertShard, ShardedExperts
from moebsr.training.expert_parallel import ShardedOptimizerState, clip_grad_norm_
from moebsr.training.loop import _agree, _agreed_signal

CPU_REFUSED = r"^No backend type associated with device type cpu \(fake NCCL"


def test_fake_nccl_refuses_cpu_tensors_and_answers_as_identical_processes():
    with nccl_world(2) as world, fake_cuda():
        assert dist.is_initialized() and dist.get_world_size() == 2 and dist.get_backend() == "nccl"
        with pytest.raises(RuntimeError, match=CPU_REFUSED):
            dist.all_reduce(torch.ones(3))
        with pytest.raises(RuntimeError, match=CPU_REFUSED):
            dist.all_gather([torch.empty(2).to("cuda"), torch.empty(2)], torch.ones(2).to("cuda"))
        total = torch.tensor([1.0, 2.0]).to("cuda")
        dist.all_reduce(total)
        parts = [torch.empty(2, device="cuda") for _ in range(2)]
        dist.all_gather(parts, total)
        gathered = torch.empty(4, device="cuda")
        dist.all_gather_into_tensor(gathered, total)
        received = torch.empty(4, device="cuda")
        dist.all_to_all_single(received, torch.arange(4.0).to("cuda"))
        assert torch.equal(total.cpu(), torch.tensor([2.0, 4.0])) and all(torch.equal(p.cpu(), total.cpu())
                                                                          for p in parts)
        assert torch.equal(gathered.cpu(), torch.tensor([2.0, 4.0, 2.0, 4.0]))
        assert torch.equal(received.cpu(), torch.tensor([0.0, 1.0, 0.0, 1.0]))  # chunk 0 of each (equal) process
    assert world.calls == ["all_reduce", "all_gather", "all_reduce", "all_gather", "all_gather_into_tensor",
                           "all_to_all_single"]


def _moe_model():
    return distinct_experts(tiny_moevit(moe=dict(num_experts=4, top_k=2))).train()


def test_the_balancing_loss_statistics_are_summed_over_processes_on_the_device(monkeypatch):
    alone = _moe_model()
    alone(images(), ["a"])
    model = _moe_model()
    with fake_cuda(), nccl_world(2) as world:
        model.to("cuda")
        batch = images().to("cuda")
        model(batch, ["a"])
        assert world.calls == ["all_reduce"] * len(model.moe_blocks)  # one per MoE layer
        aux = model.aux_loss()
        aux.backward()
        assert world.calls == ["all_reduce"] * 2 * len(model.moe_blocks)  # and its gradient's, in backward
        # equal processes: summed statistics give the same cv^2, so the global loss is the one-process loss
        torch.testing.assert_close(aux.cpu(), alone.aux_loss().detach())

        import moebsr.model.moe as moe  # planted bug: the statistics built on the CPU
        statistics = moe.routing_statistics
        monkeypatch.setattr(moe, "routing_statistics", lambda *args: statistics(*args).cpu())
        with pytest.raises(RuntimeError, match=CPU_REFUSED):
            model(batch, ["a"])


def test_the_loops_agreement_is_one_all_reduce_on_the_device_and_one_host_read(monkeypatch):
    two_processes = SimpleNamespace(num_processes=2)
    with fake_cuda() as cuda, nccl_world(2) as world:
        losses = [torch.tensor(value).to("cuda") for value in (2.5, 0.25, 1.0)]
        finite, signal, read = _agree(two_processes, losses, signal_number=15)
        assert (finite, signal, read) == (True, 15, [2.5, 0.25, 1.0]) and world.calls == ["all_reduce"]
        assert cuda.host_reads == collections.Counter(tolist=1)
        assert _agree(two_processes, [torch.tensor(float("inf")).to("cuda")], None)[:2] == (False, 0)

        import moebsr.training.loop as train  # planted bug: the signal flag made without device=
        tensor = train.torch.tensor
        monkeypatch.setattr(train.torch, "tensor", lambda *args, **kwargs: tensor(*args, **{
            k: v for k, v in kwargs.items() if k != "device"}))
        with pytest.raises(RuntimeError, match="same device"):
            _agree(two_processes, losses, signal_number=None)


def test_the_evaluations_stop_agreement_is_one_all_reduce_on_the_device_and_one_host_read():
    two_processes = SimpleNamespace(num_processes=2, device=torch.device("cuda"))
    with fake_cuda() as cuda, nccl_world(2) as world:
        assert _agreed_signal(two_processes, 15) == 15 and _agreed_signal(two_processes, None) == 0
        assert world.calls == ["all_reduce", "all_reduce"] and cuda.host_reads == collections.Counter(item=2)
    with fake_cuda(), nccl_world(2), pytest.raises(RuntimeError, match=CPU_REFUSED):
        _agreed_signal(SimpleNamespace(num_processes=2, device=torch.device("cpu")), 15)


def _sharded(parameter: torch.nn.Parameter) -> torch.nn.Parameter:
    setattr(parameter, SHARD_ATTR, ExpertShard(None, 0, 2, slice(0, parameter.shape[0])))
    return parameter


def test_gradient_clipping_with_sharded_experts_reduces_their_norm_on_the_device():
    generator = torch.Generator().manual_seed(0)
    replicated = torch.randn(3, 4, generator=generator)
    sharded = torch.randn(2, 5, generator=generator)
    gradients = [torch.randn(3, 4, generator=generator), torch.randn(2, 5, generator=generator)]
    accelerator = SimpleNamespace(unscale_gradients=lambda: None)
    with fake_cuda(), nccl_world(2) as world:
        parameters = [torch.nn.Parameter(replicated.to("cuda")), _sharded(torch.nn.Parameter(sharded.to("cuda")))]
        for parameter, gradient in zip(parameters, gradients):
            parameter.grad = gradient.to("cuda")
        total = clip_grad_norm_(accelerator, parameters, max_norm=1.0)
        assert isinstance(total, FakeCudaTensor) and world.calls == ["all_reduce"]
        # two equal processes: the replicated part once, the sharded part from both
        expected = (gradients[0].square().sum() + 2 * gradients[1].square().sum()).sqrt()
        torch.testing.assert_close(total.cpu(), expected)
        for parameter, gradient in zip(parameters, gradients):
            torch.testing.assert_close(parameter.grad.cpu(), gradient / (expected + 1e-6))


def test_sharded_experts_and_their_optimizer_state_are_gathered_on_the_device():
    from moebsr.model import Experts
    torch.manual_seed(0)
    whole = Experts(4, 8, 16, torch.nn.GELU())
    with fake_cuda(), nccl_world(2) as world:
        shard = ShardedExperts(whole.to("cuda"), None)
        assert shard.num_experts == 2 and isinstance(shard.fc1_weight, FakeCudaTensor)
        state = shard.state_dict()
        assert world.calls == ["all_gather"] * 4 and state["fc1_weight"].shape == (4, 16, 8)
        optimizer = torch.optim.AdamW(shard.parameters(), lr=0.1)
        shard.forward_batched(torch.randn(2, 3, 8).to("cuda")).square().sum().backward()
        optimizer.step()
        saved = ShardedOptimizerState(shard, optimizer).state_dict()
        exp_avg, whole_exp_avg = optimizer.state[shard.fc1_weight]["exp_avg"], saved["fc1_weight"]["exp_avg"]
        assert whole_exp_avg.device.type == "cpu" and whole_exp_avg.shape == (4, 16, 8)
        assert torch.equal(whole_exp_avg[2:], exp_avg.cpu())  # rank 1 (equal to us) fills experts 2..3
        assert world.calls.count("all_gather") == 4 + 8  # exp_avg and exp_avg_sq of the 4 expert tensors


def test_a_tutel_model_gathers_its_sharded_experts_on_the_device(tmp_path):
    pytest.importorskip("tutel")
    from run_helpers import QUICKSTART, short_run_overrides
    from safetensors.torch import save_file

    from moebsr.config import load_config
    from moebsr.training.build import model_from_config
    from moebsr.training.export import load_exported_model, write_run_document
    config = load_config(QUICKSTART, short_run_overrides(tmp_path, 1, ["moe.backend=tutel", "tasks=[digits]"]))
    write_run_document(tmp_path, config, {"digits": 10}, {})
    save_file(model_from_config(config, {"digits": 10}, load_weights=False).state_dict(),
              str(tmp_path / "model.safetensors"))
    with fake_cuda(), nccl_world(2) as world:
        model, _, _ = load_exported_model(tmp_path, device="cuda")  # sharded over the 2 processes, on the device
        assert world.calls and set(world.calls) == {"all_gather"}
        experts = {name: value for name, value in model.state_dict().items() if name.endswith("experts.fc1_weight")}
        assert experts and all(value.shape[0] == 4 for value in experts.values())  # all 4 experts, 2 per process
        assert all(p.shape[0] == 2 for name, p in model.named_parameters() if name.endswith("experts.fc1_weight"))
        with pytest.raises(RuntimeError, match=CPU_REFUSED):  # what eval did before it moved the model first
            load_exported_model(tmp_path)


def test_the_backend_benchmark_reduces_its_step_time_on_the_device(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    backends = importlib.import_module("backends")
    with fake_cuda(), nccl_world(2) as world:
        assert backends.slowest_process_seconds(0.25, torch.device("cuda", 0)) == 0.25
        assert world.calls == ["all_reduce"]
        with pytest.raises(RuntimeError, match=CPU_REFUSED):  # the bug fixed in 2f56804: a CPU timing tensor
            backends.slowest_process_seconds(0.25, torch.device("cpu"))
    sys.modules.pop("backends", None)
