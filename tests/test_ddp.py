"""When DDP is asked to search for unused parameters: exactly when some step leaves a trained parameter out."""

import pytest
from tiny_models import distinct_experts, images, tiny_moevit

from moebsr.model.adapters import apply_task_adapters
from moebsr.model.lora import apply_lora
from moebsr.training.ddp import check_every_parameter_reached, task_parameters, unused_parameters_reason
from moebsr.training.sampling import TaskSampler

TASKS = {"a": 10, "b": 3, "c": 5}


def _model(variant: str):
    if variant == "task gates":
        model = tiny_moevit(tasks=TASKS, moe=dict(blocks=[1, 3], num_experts=4, top_k=2))
    elif variant == "shared gate, bsr all":
        model = tiny_moevit(tasks=TASKS, moe=dict(blocks=[1, 3], num_experts=4, top_k=1, router="shared"), bsr="all")
    elif variant == "task adapters, dropping":
        model = tiny_moevit(tasks=TASKS, moe=dict(blocks=[1, 3], num_experts=4, top_k=2), bsr="all",
                            token_drop=dict(blocks=[0, 2], keep_rate=0.5))
        apply_task_adapters(model, list(TASKS), [1, 2], rank=2, alpha=4.0)
    elif variant == "shared LoRA":  # PEFT's adapters sit in ModuleDicts keyed 'default', shared by every task
        model = tiny_moevit(tasks=TASKS, moe=dict(blocks=[1, 3], num_experts=4, top_k=2))
        apply_lora(model, [1, 2, 3], rank=2)
    else:  # per-task gates in one MoE block only, a capacity cap of 1
        model = tiny_moevit(tasks=TASKS, moe=dict(blocks=[1, 3], num_experts=4, top_k=2, capacity_factor=1.0,
                                                  task_router_blocks=[3]))
    return distinct_experts(model).train()


def _unreached(model, step_tasks) -> set[str]:
    """The trained parameters a real forward and backward of ``step_tasks`` leaves without a gradient."""
    model.zero_grad(set_to_none=True)
    outputs = model(images(), step_tasks)
    (sum(output.sum() for output in outputs.values()) + model.aux_loss()).backward()
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad and parameter.grad is None}


@pytest.mark.parametrize("variant", ["task gates", "shared gate, bsr all", "task adapters, dropping", "shared LoRA",
                                     "one task-routed block, capacity 1"])
def test_a_step_leaves_out_exactly_the_parameters_of_the_tasks_it_does_not_train(variant):
    """The rule the decision stands on, checked against autograd: what a step does not reach is what the other tasks
    own (heads, task gates, task adapters), nothing else."""
    model = _model(variant)
    owned = task_parameters(model, list(TASKS))
    assert all(any(name.startswith(f"heads.{task}.") for name in owned[task]) for task in TASKS)
    for step_tasks in (["a"], ["b", "c"], ["a", "b", "c"]):
        others = {name for task in TASKS if task not in step_tasks for name in owned[task]}
        assert _unreached(model, step_tasks) == {name for name in others if model.get_parameter(name).requires_grad}


def test_ddp_searches_only_when_a_step_can_leave_a_parameter_out():
    model = _model("task adapters, dropping")
    sizes = {task: 100 for task in TASKS}
    one_group = TaskSampler("joint", sizes, groups=[list(TASKS)]).step_task_sets()
    assert unused_parameters_reason(model, list(TASKS), one_group) is None
    reason = unused_parameters_reason(model, list(TASKS), TaskSampler("round_robin", sizes).step_task_sets())
    assert reason.startswith("a step of ['a'] leaves ") and "without a gradient" in reason
    assert unused_parameters_reason(model, list(TASKS), TaskSampler("joint", sizes, groups=[["a", "b"], ["c"]])
                                    .step_task_sets()) is not None
    # one task: its own head and gates are on every step's path
    single = distinct_experts(tiny_moevit(tasks={"a": 10}, moe=dict(blocks=[1, 3], num_experts=4, top_k=2)))
    assert unused_parameters_reason(single, ["a"], [["a"]]) is None
    # what an absent task owns but does not train is no concern of DDP's
    for name in task_parameters(model, list(TASKS))["c"]:
        model.get_parameter(name).requires_grad_(False)
    assert unused_parameters_reason(model, list(TASKS), [["a", "b"]]) is None

def test_a_capacity_factor_below_1_can_starve_a_layer_and_asks_for_the_search():
    model = tiny_moevit(tasks={"a": 10}, moe=dict(blocks=[1, 3], num_experts=4, top_k=2, capacity_factor=0.01))
    assert "moe.capacity_factor 0.01 < 1" in unused_parameters_reason(model, ["a"], [["a"]])
    assert _unreached(model.train(), ["a"])  # 65 tokens, 4 experts: floor(0.01 * 17) = 0 slots, experts untouched


def test_a_parameter_left_out_against_the_decision_stops_before_the_optimizer():
    model = _model("task gates")
    _unreached(model, ["a", "b", "c"])
    check_every_parameter_reached(model, ["a", "b", "c"])
    _unreached(model, ["a"])
    with pytest.raises(RuntimeError, match=r"DDP: a step of \['a'\] left \S+\.b\.weight \(and \d+ more\)"):
        check_every_parameter_reached(model, ["a"])
