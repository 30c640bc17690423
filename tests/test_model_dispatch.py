import pytest
import torch
import torch.nn as nn
from numerics import GRADIENTS, assert_close_at_scale
from tiny_models import distinct_experts, images, tiny_moevit

from moebsr.model import (
    Experts,
    MoEMlp,
    TaskRouter,
    apply_capacity,
    dispatch_dense_reference,
    dispatch_grouped,
    load_balancing_loss,
)
from moebsr.model.dispatch import dispatch_padded
from moebsr.model.routing import Routing, expert_capacity


def _experts(num_experts: int = 6, dim: int = 16, hidden: int = 24) -> Experts:
    torch.manual_seed(0)
    experts = Experts(num_experts, dim, hidden, nn.GELU()).double()
    with torch.no_grad():  # distinct experts, so a wrong expert index would show
        for tensor in (experts.fc1_bias, experts.fc2_bias):
            tensor.normal_()
    return experts


def _routing(num_tokens: int = 50, num_experts: int = 6, top_k: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=generator, dtype=torch.float64)
    weight, index = logits.softmax(-1).topk(top_k, dim=-1)
    return index, weight


def test_grouped_dispatch_matches_the_dense_reference():
    experts = _experts()
    tokens = torch.randn(50, 16, dtype=torch.float64)
    index, weight = _routing()
    grouped = dispatch_grouped(tokens, index, weight, experts)
    reference = dispatch_dense_reference(tokens, index, weight, experts)
    torch.testing.assert_close(grouped, reference, rtol=0, atol=1e-12)


def test_grouped_dispatch_gradients_match_the_reference():
    experts = _experts()
    tokens = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    index, weight = _routing(40)
    weight.requires_grad_(True)
    grads = []
    for dispatch in (dispatch_grouped, dispatch_dense_reference):
        experts.zero_grad()
        out = dispatch(tokens, index, weight, experts)
        (out * torch.linspace(-1, 1, 16, dtype=torch.float64)).sum().backward()
        grads.append([t.grad.clone() for t in (tokens, weight)] + [p.grad.clone() for p in experts.parameters()])
        tokens.grad = weight.grad = None
    for grouped, reference in zip(*grads):
        torch.testing.assert_close(grouped, reference, rtol=0, atol=1e-10)


def test_capacity_drops_assignments_past_the_cap_first_choices_first():
    # 4 tokens all prefer expert 0 then expert 1; capacity = 2 * floor(0.5 * ceil(4 / 2)) = 2
    index = torch.tensor([[0, 1]] * 4)
    weight = torch.full((4, 2), 0.5)
    from moebsr.model.routing import Routing
    capped = apply_capacity(Routing(index, weight, torch.full((4, 2), 0.5)), num_experts=2, capacity_factor=0.5)
    assert capped.expert_weight.tolist() == [[0.5, 0.5], [0.5, 0.5], [0.0, 0.0], [0.0, 0.0]]
    experts = _experts(num_experts=2)
    tokens = torch.randn(4, 16, dtype=torch.float64)
    out = dispatch_grouped(tokens, index, capped.expert_weight.double(), experts)
    assert torch.equal(out[2:], torch.zeros(2, 16, dtype=torch.float64))
    torch.testing.assert_close(out, dispatch_dense_reference(tokens, index, capped.expert_weight.double(), experts))


def test_load_balancing_loss_is_cv_squared_of_importance_plus_load():
    from moebsr.model.routing import Routing
    index = torch.tensor([[0, 1], [0, 2], [0, 1]])
    weight = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    probabilities = torch.tensor([[0.6, 0.4, 0.0], [0.7, 0.0, 0.3], [0.5, 0.5, 0.0]], requires_grad=True)
    loss = load_balancing_loss(Routing(index, weight, probabilities), num_experts=3)
    importance = torch.tensor([1.8, 0.9, 0.3])  # the full softmax summed over tokens
    load = torch.tensor([3.0, 2.0, 1.0])
    expected = importance.var() / importance.mean() ** 2 + load.var() / load.mean() ** 2
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert probabilities.grad.abs().sum() > 0


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("renormalize", [False, True])
def test_balancing_loss_trains_the_gates_in_every_routing_mode(top_k, renormalize):
    # top-1 renormalised weights are always 1: a loss built on them had a gate gradient of ~3.5e-9
    torch.manual_seed(0)
    router = TaskRouter(dim=16, num_experts=8, top_k=top_k, tasks=["a"], renormalize=renormalize)
    routing = router(torch.randn(64, 16), "a")
    load_balancing_loss(routing, 8).backward()
    assert router.gates["a"].weight.grad.norm() > 1e-3


def test_balancing_loss_is_measured_before_the_capacity_cut():
    # 12 tokens choose expert 0 and 4 choose expert 1; capacity 4 per expert caps expert 0 at 4, which makes the
    # experts look balanced ([4, 4, 0, 0]) when they are not ([12, 4, 0, 0])
    layer = MoEMlp(TaskRouter(8, 4, 1, ["a"]), Experts(4, 8, 16, nn.GELU()), capacity_factor=1.0)
    with torch.no_grad():
        layer.router.gates["a"].weight.zero_()
        layer.router.gates["a"].weight[0, 0] = layer.router.gates["a"].weight[1, 1] = 10.0
    x = torch.zeros(1, 16, 8)
    x[0, :12, 0] = x[0, 12:, 1] = 1.0
    layer(x, [("a", 0, 1)])
    capped = layer.last_routing["a"]
    assert (capped.expert_weight > 0).sum().item() == 8  # the cap did drop 8 assignments
    uncapped = layer.router(x.reshape(-1, 8), "a")
    torch.testing.assert_close(layer.aux_loss, load_balancing_loss(uncapped, 4))
    kept = capped.expert_index[capped.expert_weight[:, 0] > 0]
    load = lambda index: torch.bincount(index.reshape(-1), minlength=4).float()  # noqa: E731
    cv2 = lambda values: values.var() / values.mean() ** 2  # noqa: E731
    assert cv2(load(uncapped.expert_index)) == pytest.approx(2.0)  # [12, 4, 0, 0]
    assert cv2(load(kept)) == pytest.approx(4 / 3)  # what a loss after the cut would have seen


def test_router_top_k_and_renormalisation():
    torch.manual_seed(0)
    router = TaskRouter(dim=8, num_experts=5, top_k=3, tasks=["a", "b"], renormalize=True)
    tokens = torch.randn(10, 8)
    routing = router(tokens, "b")
    probabilities = (tokens @ router.gates["b"].weight.t()).softmax(-1)
    assert torch.equal(routing.expert_index, probabilities.topk(3, -1).indices)
    torch.testing.assert_close(routing.expert_weight.sum(-1), torch.ones(10))
    assert not torch.equal(router(tokens, "a").expert_index, routing.expert_index)


def test_padded_dispatch_matches_the_grouped_one_with_dropped_assignments():
    experts = _experts()
    tokens = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    index, weight = _routing()
    capacity = expert_capacity(50, 6, 2, capacity_factor=0.5)  # 2 * floor(0.5 * 9) = 8 slots for ~17 assignments
    capped = apply_capacity(Routing(index, weight, weight), 6, 0.5).expert_weight.detach().requires_grad_(True)
    assert 0 < int((capped == 0).sum()) < capped.numel()  # some assignments dropped, some kept
    results = []
    for dispatch in (dispatch_grouped, lambda *args: dispatch_padded(*args, capacity=capacity)):
        experts.zero_grad()
        out = dispatch(tokens, index, capped, experts)
        (out * torch.linspace(-1, 1, 16, dtype=torch.float64)).sum().backward()
        results.append([out.detach()] + [t.grad.clone() for t in (tokens, capped)] +
                       [p.grad.clone() for p in experts.parameters()])
        tokens.grad = capped.grad = None
    for padded, grouped in zip(results[1], results[0]):
        torch.testing.assert_close(padded, grouped, rtol=0, atol=1e-12)


def test_padded_moevit_equals_grouped_in_outputs_balancing_loss_and_gradients():
    """Two tasks in one batch: the slots per expert are the sum of both gates' capacities (fp32, 1e-5)."""
    results = {}
    for dispatch in ("grouped", "padded"):
        model = distinct_experts(tiny_moevit(token_drop=dict(keep_rate=0.5), moe=dict(
            num_experts=4, top_k=2, capacity_factor=1.0, dispatch=dispatch))).train()
        outputs = model(images(), ["a", "b"])
        dropped = sum(int((routing.expert_weight == 0).sum()) for block in model.moe_blocks
                      for routing in model.backbone.blocks[block].mlp.last_routing.values())
        loss = sum(output.square().mean() for output in outputs.values()) + model.aux_loss()
        loss.backward()
        results[dispatch] = (outputs, model.aux_loss().detach(), dropped,
                             {name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    (grouped, grouped_aux, grouped_dropped, grouped_grads), (padded, padded_aux, padded_dropped, padded_grads) = (
        results["grouped"], results["padded"])
    assert grouped_dropped == padded_dropped > 0  # the capacity cap is in play
    for task in ("a", "b"):
        assert_close_at_scale(padded[task], grouped[task])
    assert_close_at_scale(padded_aux, grouped_aux)
    assert padded_grads.keys() == grouped_grads.keys() and any(".experts." in name for name in padded_grads)
    for name, grad in padded_grads.items():
        assert_close_at_scale(grad, grouped_grads[name], GRADIENTS, msg=name)


def test_padded_dispatch_needs_a_capacity_factor():
    with pytest.raises(ValueError, match=r"^moe.dispatch: 'padded' needs moe.capacity_factor"):
        MoEMlp(TaskRouter(8, 4, 1, ["a"]), Experts(4, 8, 16, nn.GELU()), dispatch="padded")
    with pytest.raises(ValueError, match=r"^moe.dispatch: 'dense' is invalid; accepted: grouped, padded$"):
        MoEMlp(TaskRouter(8, 4, 1, ["a"]), Experts(4, 8, 16, nn.GELU()), capacity_factor=1.0, dispatch="dense")
