import re

import pytest
import torch
import torch.nn.functional as F
from numerics import GRADIENTS, assert_close_at_scale
from tiny_models import distinct_experts, images, tiny_moevit

from moebsr.model.token_drop import FUSED_TOKEN

TASKS = {"a": 10, "b": 3, "c": 5}


def _dropping_model(decision: str, **kwargs):
    """MoE at blocks 1 and 3, dropping at 0, 2 and 3: one stage before the per-task split, two after it."""
    kwargs.setdefault("moe", dict(blocks=[1, 3], num_experts=4, top_k=2))
    model = tiny_moevit(tasks=TASKS, token_drop=dict(blocks=[0, 2, 3], keep_rate=0.5, decision=decision), **kwargs)
    return distinct_experts(model)


@pytest.mark.parametrize("router", ["task", "shared"])
@pytest.mark.parametrize("drop", [None, dict(keep_rate=0.5, decision="shared"),
                                  dict(keep_rate=0.5, decision="per_task")])
def test_joint_outputs_equal_each_task_run_alone(router, drop):
    model = tiny_moevit(tasks=TASKS, moe=dict(num_experts=4, top_k=2, router=router), token_drop=drop)
    model = distinct_experts(model).eval()
    x = images(5)
    with torch.no_grad():
        joint = model(x, list(TASKS))
        joint_kept = model.last_kept_tokens
        for task in TASKS:
            assert_close_at_scale(model(x, task)[task], joint[task])
            for block, kept in model.last_kept_tokens.items():
                assert torch.equal(kept[task], joint_kept[block][task])


def test_shared_decision_keeps_the_same_tokens_for_every_task_at_every_block():
    model = _dropping_model("shared").eval()
    assert model.ranking_block() == 1  # the first per-task MoE block: the last attention all tasks share
    kept = model.kept_tokens(images(6), list(TASKS))
    assert sorted(kept) == [0, 2, 3]
    for block, per_task in kept.items():
        for task in TASKS:
            assert torch.equal(per_task[task], per_task["a"]), (block, task)
    # the decision is the top of block 1's CLS attention, nested across the later stages
    patches_2 = set(kept[2]["a"][0].tolist()) - {FUSED_TOKEN}
    patches_3 = set(kept[3]["a"][0].tolist()) - {FUSED_TOKEN}
    assert patches_3 <= patches_2 <= set(kept[0]["a"][0].tolist())


def test_per_task_decision_lets_the_tasks_disagree_after_the_split():
    model = _dropping_model("per_task").eval()
    assert model.ranking_block() is None
    kept = model.kept_tokens(images(6), list(TASKS))
    assert all(torch.equal(kept[0][task], kept[0]["a"]) for task in TASKS)  # before the split: one stream
    assert any(not torch.equal(kept[block][task], kept[block]["a"]) for block in (2, 3) for task in TASKS)


def test_shared_ranking_is_the_cls_attention_of_the_ranking_block():
    model = _dropping_model("shared").eval()
    x = images(3)
    ranking = {}
    block = model.blocks[1]
    original = block.forward_attention

    def spy(tokens, selection, make_ranking=False, task_rows=None):
        out, new_selection = original(tokens, selection, make_ranking, task_rows)
        ranking["scores"], ranking["origin"] = new_selection.ranking, new_selection.origin
        return out, new_selection
    block.forward_attention = spy
    kept = model.kept_tokens(x, ["a"])
    scores, origin = ranking["scores"], ranking["origin"]
    keep = kept[2]["a"].shape[1] - 1  # block 2 appends its fused token
    for row in range(3):
        expected = origin[row, scores[row].topk(keep).indices.sort().values]
        assert torch.equal(kept[2]["a"][row], torch.cat([expected, torch.tensor([FUSED_TOKEN])]))


@pytest.mark.parametrize("decision", ["shared", "per_task"])
def test_a_batch_trains_as_the_mean_of_its_halves(decision):
    # what data parallelism relies on: the gradient of a batch equals the mean over its shards, dropping included
    model = _dropping_model(decision, bsr="all").train()
    x, generator = images(8), torch.Generator().manual_seed(3)
    labels = {task: torch.randint(0, outputs, (8,), generator=generator) for task, outputs in TASKS.items()}

    def grads(rows: slice):
        model.zero_grad()
        out = model(x[rows], list(TASKS))
        sum(F.cross_entropy(out[t], labels[t][rows]) for t in TASKS).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    whole, first, second = grads(slice(0, 8)), grads(slice(0, 4)), grads(slice(4, 8))
    for name, grad in whole.items():
        assert_close_at_scale((first[name] + second[name]) / 2, grad, GRADIENTS, msg=name)


def test_joint_gradients_equal_the_sum_of_separate_runs():
    model = tiny_moevit(bsr="paper")
    x = images(3)
    out = model(x, ["a", "b"])
    (out["a"].square().sum() + out["b"].square().sum()).backward()
    joint = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    for task in ("a", "b"):
        model(x, task)[task].square().sum().backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert_close_at_scale(parameter.grad, joint[name], GRADIENTS, msg=name)


def test_the_trunk_runs_once_for_all_tasks():
    model = tiny_moevit(tasks={"a": 2, "b": 2, "c": 2}, moe=dict(blocks=[2], num_experts=4, top_k=2))
    rows = []
    for block in model.blocks:
        block.norm1.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    model(images(4), ["a", "b", "c"])
    assert rows == [4, 4, 4, 12]  # blocks 0-2 attention shared; the routed MLP of block 2 splits the tasks


def test_per_task_routing_in_chosen_blocks_only_keeps_the_trunk_shared_up_to_them():
    """``task_router_blocks=[3]``: block 1 shares one gate, block 3 has one per task; the streams split there, a
    joint pass still equals each task alone, and the joint pass computes less than with per-task gates everywhere."""
    from torch.utils.flop_counter import FlopCounterMode

    from moebsr.analysis.profiling import unfused_attention

    def build(task_router_blocks):
        return _dropping_model("shared", moe=dict(blocks=[1, 3], num_experts=4, top_k=2,
                                                  task_router_blocks=task_router_blocks)).eval()

    model = build([3])
    assert list(model.blocks[1].mlp.router.gates) == ["shared"]
    assert list(model.blocks[3].mlp.router.gates) == list(TASKS)
    assert model.ranking_block() is None  # no dropping stage after block 3: every stage ranks on the shared stream
    x = images(5)
    with torch.no_grad():
        joint = model(x, list(TASKS))
        for task in TASKS:
            assert_close_at_scale(model(x, task)[task], joint[task])

    def joint_flops(network):
        with unfused_attention(network), FlopCounterMode(display=False) as counter, torch.no_grad():
            network(x, list(TASKS))
        return counter.get_total_flops()
    assert joint_flops(model) < 0.75 * joint_flops(build(None))


@pytest.mark.parametrize("moe, message", [
    (dict(router="shared", task_router_blocks=[3]), "does nothing with moe.router=shared"),
    (dict(task_router_blocks=[2]), "[2] are not MoE blocks"),
    (dict(task_router_blocks=[]), "[] is empty"),
    (dict(task_router_blocks=[7]), "block index 7 out of range"),
])
def test_task_router_blocks_bad_values_fail_in_one_line(moe, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_moevit(tasks=TASKS, moe=dict(blocks=[1, 3], num_experts=4, top_k=2, **moe))
