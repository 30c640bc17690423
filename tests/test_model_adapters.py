"""Task adapters: one LoRA delta per task, applied to its own rows of a joint batch, merged exactly at export."""

import pytest
import torch
import torch.nn.functional as F
from numerics import GRADIENTS, assert_close_at_scale
from run_helpers import QUICKSTART, short_run_overrides
from tiny_models import distinct_experts, images, tiny_moevit

from moebsr.config import ConfigError, load_config
from moebsr.deploy import extract_task
from moebsr.model.adapters import TaskLoRALinear, apply_task_adapters
from moebsr.training.build import model_from_config

TASKS = {"a": 10, "b": 3, "c": 5}


def _adapted(decision: str = "shared", blocks=(1, 2), **kwargs):
    """MoE at 1 and 3, dense 0 and 2; adapters in blocks 1 (attention) and 2 (attention and MLP); dropping at 0, 2,
    3. Every adapter's B made non-zero (it starts at zero), different per task."""
    model = tiny_moevit(tasks=TASKS, moe=dict(blocks=[1, 3], num_experts=4, top_k=2), bsr="all",
                        token_drop=dict(blocks=[0, 2, 3], keep_rate=0.5, decision=decision))
    apply_task_adapters(model, list(TASKS), blocks, rank=2, alpha=4.0, **kwargs)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return distinct_experts(model)


@pytest.mark.parametrize("decision", ["shared", "per_task"])
def test_a_joint_pass_equals_each_task_alone_and_each_task_its_own_merged_model(decision):
    model = _adapted(decision).eval()
    assert model.task_split_point() == (1, "attn")  # the first adapter is in block 1's attention
    assert model.ranking_block() == (0 if decision == "shared" else None)  # the last attention all tasks share
    x = images(5)
    with torch.no_grad():
        joint = model(x, list(TASKS))
        joint_kept = model.last_kept_tokens
        for task in TASKS:
            alone = model(x, task)[task]
            assert_close_at_scale(alone, joint[task])
            for block, kept in model.last_kept_tokens.items():
                assert torch.equal(kept[task], joint_kept[block][task])
            # a model with only this task's delta merged into plain linear layers computes the same
            merged = extract_task(model, task)
            assert not any(isinstance(m, TaskLoRALinear) for m in merged.modules())
            assert_close_at_scale(merged(x, task)[task], joint[task])
    if decision == "shared":  # every task keeps the same patches at every block
        assert all(torch.equal(kept[t], kept["a"]) for kept in joint_kept.values() for t in TASKS)
    # the adapters matter: without task b's delta, task b's output changes
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TaskLoRALinear):
                module.lora_B["b"].zero_()
        assert not torch.allclose(model(x, "b")["b"], joint["b"], atol=1e-4)


def test_a_task_adapter_gets_gradients_only_from_its_own_task_loss():
    model = _adapted().train()
    x = images(4)
    outputs = model(x, list(TASKS))
    outputs["b"].square().sum().backward()
    grads = {name: parameter.grad for name, parameter in model.named_parameters() if ".lora_" in name}
    assert grads and all(name.rsplit(".", 1)[-1] in TASKS for name in grads)
    for name, grad in grads.items():
        if name.endswith(".b"):
            assert grad is not None and grad.abs().sum() > 0, name
        else:  # task a's and c's adapters ran on their own rows only, which task b's loss does not see
            assert grad is None or torch.count_nonzero(grad) == 0, name
    # and the joint step's gradients are the sum of the tasks' separate steps
    model.zero_grad()
    labels = {task: torch.arange(4) % outputs_count for task, outputs_count in TASKS.items()}
    out = model(x, list(TASKS))
    sum(F.cross_entropy(out[t], labels[t]) for t in TASKS).backward()
    joint = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    separate = {}
    for task in TASKS:
        model.zero_grad()
        F.cross_entropy(model(x, task)[task], labels[task]).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                separate[n] = separate.get(n, 0) + p.grad
    assert joint.keys() == separate.keys()
    for name, grad in joint.items():
        assert_close_at_scale(grad, separate[name], GRADIENTS, msg=name)


def test_adapters_checkpointed_blocks_see_their_task_rows_in_backward():
    model = _adapted().train()
    x = images(3)
    losses = {}
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        out = model(x, list(TASKS))
        sum(out[t].square().sum() for t in TASKS).backward()
        losses[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in losses[False].items():
        assert_close_at_scale(losses[True][name], grad, GRADIENTS, msg=name)


def _config(tmp_path, *extra):
    return load_config(QUICKSTART, short_run_overrides(tmp_path, 1, ["adapters.enabled=true", *extra]))


def test_every_adapters_key_has_its_effect(tmp_path):
    heads = {"mnist": 10, "mnist_parity": 2, "digits": 10, "animals": 10}

    def adapted(*extra):
        torch.manual_seed(0)
        config = _config(tmp_path, "model.checkpoint=null", "bsr.preset=last_k", "bsr.last_k=3", *extra)
        model = model_from_config(config, heads)
        return {name: module for name, module in model.named_modules() if isinstance(module, TaskLoRALinear)}

    # by default the blocks BSR trains (the last 3 of 4), attention and a dense MLP (block 1); the MoE blocks' experts
    # (MoE at 0, 2, 3 at depth 4) take none
    assert sorted(adapted()) == ["backbone.blocks.1.attn.proj", "backbone.blocks.1.attn.qkv",
                                 "backbone.blocks.1.mlp.fc1", "backbone.blocks.1.mlp.fc2",
                                 *(f"backbone.blocks.{b}.attn.{m}" for b in (2, 3) for m in ("proj", "qkv"))]
    assert sorted(adapted("adapters.blocks=[3]")) == ["backbone.blocks.3.attn.proj", "backbone.blocks.3.attn.qkv"]
    assert sorted(adapted("adapters.blocks=[1]", "adapters.modules=[fc2]")) == ["backbone.blocks.1.mlp.fc2"]
    layer = adapted("adapters.rank=3")["backbone.blocks.2.attn.qkv"]
    assert layer.lora_A["digits"].shape == (3, 64) and layer.lora_B["digits"].shape == (192, 3)
    assert sorted(layer.tasks) == sorted(heads) and layer.scale == 8.0 / 3
    assert adapted("adapters.alpha=6", "adapters.rank=3")["backbone.blocks.2.attn.qkv"].scale == 2.0
    torch.manual_seed(0)
    plain = model_from_config(load_config(QUICKSTART, short_run_overrides(tmp_path, 1, ["model.checkpoint=null"])),
                              heads)
    assert not any(isinstance(m, TaskLoRALinear) for m in plain.modules())
    from moebsr.training.recipe import (
        describe_recipe,  # the start-of-run block names what was adapted, and nothing else
    )
    config = _config(tmp_path, "model.checkpoint=null", "bsr.preset=last_k", "bsr.last_k=3")
    assert "· task adapters rank 4 on fc1, fc2, proj, qkv of blocks [1, 2, 3] ·" in describe_recipe(
        config, model_from_config(config, heads))


def test_the_streams_split_where_the_first_task_specific_parameters_are():
    shared_gate = tiny_moevit(tasks=TASKS, moe=dict(blocks=[1, 3], num_experts=4, top_k=2, router="shared"))
    assert shared_gate.task_split_point() is None  # nothing is task-specific but the heads
    apply_task_adapters(shared_gate, list(TASKS), [2], modules=["fc1"])
    assert shared_gate.task_split_point() == (2, "mlp")  # the adapted dense MLP of block 2
    apply_task_adapters(shared_gate, list(TASKS), [3], modules=["qkv"])
    assert shared_gate.task_split_point() == (2, "mlp")  # the first one counts
    per_task_gate = tiny_moevit(tasks=TASKS, moe=dict(blocks=[1, 3], num_experts=4, top_k=2))
    assert per_task_gate.task_split_point() == (1, "mlp")
    apply_task_adapters(per_task_gate, list(TASKS), [1], modules=["proj"])
    assert per_task_gate.task_split_point() == (1, "attn")


def test_bad_adapter_settings_are_refused_in_one_line(tmp_path):
    for extra, message in [
        (["adapters.modules=[mlp]"], "adapters.modules: 'mlp' is invalid; accepted: qkv, proj, fc1, fc2"),
        (["adapters.rank=0"], "adapters.rank: 0 is invalid; accepted: an integer >= 1"),
        (["lora.enabled=true"], "adapters.enabled: true with lora.enabled: true; accepted: one of them"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            _config(tmp_path, *extra)
    from moebsr.training.build import check_config_against_model
    with pytest.raises(ConfigError, match=r"adapters.blocks: an adapter in block 0's attention leaves no attention "
                                          r"every task shares to rank tokens by"):
        check_config_against_model(_config(tmp_path, "adapters.blocks=[0, 1]", "model.checkpoint=null"))
    with pytest.raises(ConfigError, match=r"adapters.rank=2: does nothing while adapters.enabled is false"):
        load_config(QUICKSTART, short_run_overrides(tmp_path, 1, ["adapters.rank=2"]))
