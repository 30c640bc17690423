import pytest
import torch

from tiny_models import images, tiny_moevit


@pytest.mark.parametrize("router", ["task", "shared"])
@pytest.mark.parametrize("drop", [None, dict(keep_rate=0.5)])
def test_joint_outputs_equal_each_task_run_alone(router, drop):
    model = tiny_moevit(tasks={"a": 10, "b": 3, "c": 5}, moe=dict(num_experts=4, top_k=2, router=router),
                        token_drop=drop).eval()
    x = images(5)
    with torch.no_grad():
        joint = model(x, ["a", "b", "c"])
        for task in ("a", "b", "c"):
            torch.testing.assert_close(joint[task], model(x, task)[task], rtol=1e-5, atol=1e-6)


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
            torch.testing.assert_close(parameter.grad, joint[name], rtol=1e-4, atol=1e-6)


def test_the_trunk_runs_once_for_all_tasks():
    model = tiny_moevit(tasks={"a": 2, "b": 2, "c": 2}, moe=dict(blocks=[2], num_experts=4, top_k=2))
    rows = []
    for block in model.blocks:
        block.norm1.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    model(images(4), ["a", "b", "c"])
    assert rows == [4, 4, 4, 12]  # blocks 0-2 attention shared; the routed MLP of block 2 splits the tasks
