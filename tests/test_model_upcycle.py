import copy

import torch
from numerics import assert_close_at_scale
from tiny_models import images, tiny_vit

from moebsr.model import Experts, create_moevit


def test_upcycled_experts_are_copies_of_the_dense_mlp():
    dense = tiny_vit()
    mlp = dense.blocks[1].mlp
    experts = Experts.upcycle(mlp, num_experts=5)
    tokens = torch.randn(7, 64)
    for expert in range(5):
        torch.testing.assert_close(experts.forward_expert(expert, tokens), mlp(tokens), rtol=0, atol=0)


def test_moevit_with_renormalised_gates_equals_the_dense_vit_at_step_zero():
    dense = tiny_vit().eval()
    moevit = create_moevit(copy.deepcopy(dense), {"a": 10, "b": 3}, moe=dict(blocks=[0, 1, 2, 3], num_experts=8,
                           top_k=3, renormalize=True), bsr="all").eval()
    x = images()
    with torch.no_grad():
        expected = dense.forward_features(x)
        for tasks in ("a", ["a", "b"]):
            features, task_rows = moevit.forward_features(x, tasks)
            for _, start, end in task_rows:
                assert_close_at_scale(features[start:end], expected)


def test_raw_probabilities_scale_the_dense_output_by_the_top_k_mass():
    dense = tiny_vit()
    moevit = create_moevit(copy.deepcopy(dense), {"a": 2}, moe=dict(blocks=[2], num_experts=4, top_k=2,
                           renormalize=False))
    layer = moevit.blocks[2].mlp
    x = torch.randn(2, 65, 64)
    out = layer(x, [("a", 0, 2)])
    mass = layer.last_routing["a"].expert_weight.sum(-1).reshape(2, 65, 1)
    assert_close_at_scale(out, dense.blocks[2].mlp(x) * mass)


def test_other_expert_width_is_freshly_initialised():
    experts = Experts.upcycle(tiny_vit().blocks[0].mlp, num_experts=2, hidden_features=32)
    assert experts.fc1_weight.shape == (2, 32, 64) and experts.fc2_weight.shape == (2, 64, 32)
