"""One task out of a multitask model: extraction, pruning, the dense collapse, the timm twin and the ONNX graph."""

import pytest
import timm
import torch
from numerics import assert_close_at_scale
from safetensors.torch import save_file
from timm.layers import Mlp
from tiny_models import TINY_VIT, distinct_experts, images, tiny_moevit

from moebsr.deploy import (
    check_onnx,
    choose_experts,
    choose_layer_experts,
    export_onnx,
    extract_task,
    measure_routing_mass,
    prune_experts,
)
from moebsr.deploy.bundle import is_plain_vit, timm_state_dict
from moebsr.deploy.onnx_export import experts_reached
from moebsr.model.lora import apply_lora
from moebsr.model.prune import PrunedRouter, moe_parameter_count

TASKS = {"a": 10, "b": 3, "c": 5}
DROP = dict(blocks=[0, 2, 3], keep_rate=0.5, decision="shared")  # one stage before the split at block 1, two after


def _model(**kwargs):
    kwargs.setdefault("moe", dict(blocks=[1, 3], num_experts=4, top_k=2))
    kwargs.setdefault("token_drop", DROP)
    return distinct_experts(tiny_moevit(tasks=TASKS, **kwargs)).eval()


@pytest.mark.parametrize("decision", ["shared", "per_task"])
def test_an_extracted_task_equals_the_multitask_model_for_that_task(decision):
    model = _model(token_drop={**DROP, "decision": decision})
    apply_lora(model, blocks=[1, 2], rank=2)
    with torch.no_grad():  # LoRA B starts at zero: give the adapters something to merge
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    x = images(6)
    with torch.no_grad():
        joint = model(x, list(TASKS))
        for task in TASKS:
            single = extract_task(model, task)
            assert_close_at_scale(single(x, task)[task], joint[task])
            keys = set(single.state_dict())
            assert {k for k in keys if k.startswith("heads.")} == {f"heads.{task}.weight", f"heads.{task}.bias"}
            assert {k.split(".gates.")[1].split(".")[0] for k in keys if ".gates." in k} == {task}
            assert not any("lora_" in k or "base_layer" in k for k in keys)  # merged, plain linear layers again
    assert model.task_split_point() == (1, "mlp") and extract_task(model, "a").task_split_point() == (1, "mlp")


def _zero_mass_experts(model, task, x):
    """The experts each MoE layer's gate sent no token of ``x`` to (a premise the pruning tests check)."""
    mass = measure_routing_mass(model, task, [x])
    return mass, {index: [e for e in range(len(m.share)) if m.share[e] == 0] for index, m in mass.items()}


@pytest.mark.parametrize("renormalize", [True, False])
def test_pruning_experts_that_carried_no_mass_leaves_the_outputs_unchanged(renormalize):
    model = _model(moe=dict(blocks=[1, 3], num_experts=8, top_k=1, renormalize=renormalize))
    single = extract_task(model, "a")
    x = images(2)
    mass, unused = _zero_mass_experts(single, "a", x)
    assert all(unused.values()), unused  # premise: every layer has experts no token of x chose
    with torch.no_grad():
        expected = model(x, list(TASKS))["a"]
        pruned = prune_experts(extract_task(model, "a"),
                               {i: [e for e in range(8) if e not in unused[i]] for i in unused})
        assert_close_at_scale(pruned(x, "a")["a"], expected)
    for index, layer in pruned.moe_layers().items():
        assert layer.num_experts == 8 - len(unused[index]) and isinstance(layer.router, PrunedRouter)
        # raw probabilities keep their denominator through the removed rows; renormalised ones need no such rows
        assert (layer.router.normalizer is None) == renormalize
    if not renormalize:  # without the removed rows the weights would change: the normaliser is what keeps it exact
        for layer in pruned.moe_layers().values():
            layer.router.normalizer = None
        with torch.no_grad():
            assert not torch.allclose(pruned(x, "a")["a"], expected, atol=1e-3)


def test_pruning_a_model_with_bf16_frozen_experts_keeps_each_parameters_dtype_and_the_outputs():
    from moebsr.model.frozen_storage import store_frozen_weights
    model = _model(moe=dict(blocks=[1, 3], num_experts=8, top_k=1))
    model.requires_grad_(False)
    assert store_frozen_weights(model, "bf16")  # every layer frozen: the expert banks are stored in bf16
    single = extract_task(model, "a")
    x = images(2)
    _, unused = _zero_mass_experts(single, "a", x)
    with torch.no_grad():
        expected = single(x, "a")["a"]
        pruned = prune_experts(single, {i: [e for e in range(8) if e not in unused[i]] for i in unused})
        assert_close_at_scale(pruned(x, "a")["a"], expected)
    for layer in pruned.moe_layers().values():
        bank = layer.experts
        assert (bank.fc1_weight.dtype, bank.fc2_weight.dtype) == (torch.bfloat16, torch.bfloat16)
        assert (bank.fc1_bias.dtype, bank.fc2_bias.dtype) == (torch.float32, torch.float32)


def test_pruning_sends_the_removed_experts_tokens_to_the_kept_ones_and_counts_fewer_parameters():
    model = _model()
    single = extract_task(model, "a")
    x = images(4)
    mass = measure_routing_mass(single, "a", [x])
    assert all(abs(m.share.sum().item() - 1) < 1e-5 and m.images == 4 for m in mass.values())
    kept = {1: [0, 2], 3: [1, 2, 3]}
    pruned = prune_experts(extract_task(model, "a"), kept)
    with torch.no_grad():
        pruned(x, "a")
    assert {i: sorted(set(r)) for i, r in experts_reached(pruned, "a").items()} == {1: [0, 1], 3: [0, 1, 2]}
    gate = model.blocks[1].mlp.router.gates["a"].weight
    torch.testing.assert_close(pruned.blocks[1].mlp.router.gates["a"].weight, gate[[0, 2]])
    torch.testing.assert_close(pruned.blocks[3].mlp.experts.fc2_weight, model.blocks[3].mlp.experts.fc2_weight[1:])
    per_expert = model.blocks[1].mlp.experts.fc1_weight[0].numel() * 2 + 64 + 4 * 64  # fc1+fc2, biases
    assert moe_parameter_count(model, [1, 3]) - moe_parameter_count(pruned, [1, 3]) == (
        3 * per_expert + 3 * 64 + 2 * 2 * 4 * 64)  # 3 experts, their rows of gate a; gates b and c of 2 layers


def test_choose_experts_by_share_or_by_coverage():
    share = torch.tensor([0.5, 0.02, 0.3, 0.18])
    assert choose_experts(share, "share", 0.1) == [0, 2, 3]
    assert choose_experts(share, "share", 0.9) == [0]  # never none
    assert choose_experts(share, "coverage", 0.8) == [0, 2]
    assert choose_experts(share, "coverage", 0.81) == [0, 2, 3]
    assert choose_experts(share, "coverage", 1.0) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="--criterion: 'mass' is invalid; accepted: share, coverage, budget"):
        choose_experts(share, "mass", 0.1)


def test_a_budget_keeps_the_heaviest_experts_over_all_layers_and_one_per_layer_at_least():
    shares = {1: torch.tensor([0.5, 0.02, 0.3, 0.18]), 3: torch.tensor([0.1, 0.1, 0.1, 0.7]),
              5: torch.tensor([0.25, 0.25, 0.26, 0.24])}
    # 12 experts: 6 kept; the three layers' heaviest (0.5, 0.7, 0.26), then 0.3, 0.25, 0.25 (layer 5's, in order)
    assert choose_layer_experts(shares, "budget", 0.5) == {1: [0, 2], 3: [3], 5: [0, 1, 2]}
    assert choose_layer_experts(shares, "budget", 7 / 12) == {1: [0, 2], 3: [3], 5: [0, 1, 2, 3]}
    assert choose_layer_experts(shares, "budget", 0.0) == {1: [0], 3: [3], 5: [2]}  # never a layer left empty
    assert choose_layer_experts(shares, "budget", 1.0) == {index: [0, 1, 2, 3] for index in shares}
    # the other criteria choose per layer, as choose_experts does
    assert choose_layer_experts(shares, "share", 0.2) == {1: [0, 2], 3: [3], 5: [0, 1, 2, 3]}
    with pytest.raises(ValueError, match=r"--threshold: 1.5 is invalid; accepted: a number in \[0, 1\]"):
        choose_layer_experts(shares, "budget", 1.5)
    with pytest.raises(ValueError, match="--criterion budget: chooses across MoE layers"):
        choose_experts(shares[1], "budget", 0.5)


def test_a_layer_left_with_one_expert_is_a_dense_mlp_equal_to_that_expert():
    model = _model()
    collapsed = prune_experts(extract_task(model, "b"), {1: [2], 3: [0]})
    assert [type(collapsed.blocks[i].mlp) for i in (1, 3)] == [Mlp, Mlp]
    assert collapsed.moe_blocks == () and collapsed.ranking_block() == 1  # still ranks where the model did
    tokens = torch.randn(7, 64)
    with torch.no_grad():
        assert_close_at_scale(collapsed.blocks[1].mlp(tokens), model.blocks[1].mlp.experts.forward_expert(2, tokens))
    # with raw softmax weights a lone expert is scaled by its gate probability: it keeps its gate
    raw = _model(moe=dict(blocks=[1, 3], num_experts=4, top_k=2, renormalize=False))
    assert prune_experts(extract_task(raw, "b"), {1: [2]}).blocks[1].is_moe


def test_a_collapsed_model_loads_in_timm_and_matches_with_dropping_off(tmp_path):
    model = _model()
    collapsed = prune_experts(extract_task(model, "a"), {1: [1], 3: [3]})
    assert is_plain_vit(collapsed)
    path = tmp_path / "backbone.safetensors"
    save_file(timm_state_dict(collapsed), str(path))
    x = images(3)
    arch = dict(TINY_VIT)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=10, **arch,
                            pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
    with torch.no_grad():
        assert not torch.allclose(vit(x), collapsed(x, "a")["a"], atol=1e-3)  # timm's ViT drops no token
        collapsed.set_keep_rate(1.0)
        assert_close_at_scale(collapsed(x, "a")["a"], vit(x))
        # without the class count in the overlay timm keeps the backbone but resets the head
        reset = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=10, **arch,
                                  pretrained_cfg_overlay=dict(file=str(path))).eval()
        torch.testing.assert_close(reset.forward_head(reset.forward_features(x), pre_logits=True),
                                   vit.forward_head(vit.forward_features(x), pre_logits=True))
        assert not torch.allclose(reset(x), vit(x), atol=1e-3)


def test_the_onnx_graph_routes_each_input_itself_and_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime", reason="the deploy extra is not installed (pip install -e '.[deploy]')")
    pytest.importorskip("onnxscript", reason="the deploy extra is not installed (pip install -e '.[deploy]')")
    model = _model(moe=dict(blocks=[1, 3], num_experts=4, top_k=1))
    single = prune_experts(extract_task(model, "c"), {1: [0, 1, 3]})
    trace_input = torch.zeros(1, 3, 32, 32)  # one constant image: its tokens reach few experts
    check_input = images(9, seed=4)
    with torch.no_grad():
        single(trace_input, "c")
        traced_reach = experts_reached(single, "c")
        single(check_input, "c")
        check_reach = experts_reached(single, "c")
    assert check_reach == {1: [0, 1, 2], 3: [0, 1, 2, 3]}  # every kept expert
    assert all(len(traced_reach[i]) < len(check_reach[i]) for i in check_reach)  # premise: routed differently
    path = tmp_path / "model.onnx"
    export_onnx(single, "c", path, trace_input)
    check = check_onnx(path, single, "c", check_input, tolerance=1e-4)
    assert check.passed and check.reaches_every_expert and check.images == 9
    assert check.max_abs_diff < 1e-4
