"""``moe.expert_rank``: experts as rank-r deltas of the one frozen dense MLP they were upcycled from."""

import copy
import importlib.util

import pytest
import torch
from tiny_models import images, tiny_moevit, tiny_vit

from moebsr.analysis.profiling import count_parameters, synthetic_labels, training_loss
from moebsr.model.dispatch import dispatch_dense_reference, dispatch_grouped, dispatch_padded
from moebsr.model.low_rank_experts import LowRankExperts

LABELS = synthetic_labels({"a": 10, "b": 3}, 8)
RANK = 4
BSR_BLOCK_3 = dict(preset="custom", trainable_blocks=[3])


def _pair(**bsr):
    """The same tiny model with whole-copy experts and with rank-4 experts (MoE at blocks 1 and 3)."""
    bsr = bsr or BSR_BLOCK_3
    whole = tiny_moevit(moe=dict(blocks=[1, 3], num_experts=4, top_k=2), bsr=bsr)
    low = tiny_moevit(moe=dict(blocks=[1, 3], num_experts=4, top_k=2, expert_rank=RANK), bsr=bsr)
    # the same routers and heads (the banks draw different random numbers before them)
    shared = {name: value for name, value in whole.state_dict().items() if ".mlp.experts." not in name}
    assert not low.load_state_dict(shared, strict=False).unexpected_keys
    return whole.train(), low.train()


def _random_deltas(bank: LowRankExperts, seed: int = 3) -> LowRankExperts:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("fc1_lora_b", "fc2_lora_b", "fc1_bias", "fc2_bias"):
            parameter = getattr(bank, name)
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return bank


def test_upcycled_low_rank_experts_equal_the_whole_copies_at_step_0():
    whole, low = _pair()
    assert isinstance(low.blocks[3].mlp.experts, LowRankExperts) and low.blocks[3].mlp.experts.rank == RANK
    batch = images(8)
    torch.manual_seed(0)
    losses = [training_loss(model, batch, LABELS, aux_weight=0.0) for model in (whole, low)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)


def test_only_the_deltas_and_biases_train_and_the_count_is_the_formula():
    whole, low = _pair()
    bank = low.blocks[3].mlp.experts
    dim, hidden, experts = bank.dim, bank.hidden_features, bank.num_experts
    assert not bank.fc1_weight.requires_grad and not bank.fc2_weight.requires_grad
    trainable = {name for name, p in bank.named_parameters() if p.requires_grad}
    assert trainable == {"fc1_bias", "fc2_bias", "fc1_lora_a", "fc1_lora_b", "fc2_lora_a", "fc2_lora_b"}
    assert sum(p.numel() for p in bank.parameters() if p.requires_grad) == experts * (2 * RANK * (dim + hidden)
                                                                                      + dim + hidden)
    # the model's trainable count falls by exactly the experts' difference; the frozen block 1 holds one MLP + deltas
    whole_bank = whole.blocks[3].mlp.experts
    difference = sum(p.numel() for p in whole_bank.parameters()) - sum(
        p.numel() for p in bank.parameters() if p.requires_grad)
    assert count_parameters(whole)[0] - count_parameters(low)[0] == difference
    assert count_parameters(low)[1] < count_parameters(whole)[1]
    # the planner's per-unit count is what trains, not the frozen shared copy
    from moebsr.planning.costs import unit_parameter_counts
    counts = unit_parameter_counts(low, [(3, "mlp")])
    assert counts[(3, "mlp")] == sum(p.numel() for p in bank.parameters() if p.requires_grad) + sum(
        p.numel() for p in low.blocks[3].ls2.parameters())


def test_a_training_step_moves_the_deltas_and_never_the_shared_weights():
    _, low = _pair()
    bank = low.blocks[3].mlp.experts
    before = {name: p.detach().clone() for name, p in bank.named_parameters()}
    optimizer = torch.optim.AdamW(low.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        training_loss(low, images(8), LABELS).backward()
        optimizer.step()
    assert torch.equal(bank.fc1_weight, before["fc1_weight"]) and torch.equal(bank.fc2_weight, before["fc2_weight"])
    for name in ("fc1_lora_b", "fc2_lora_b", "fc1_bias"):
        assert not torch.equal(getattr(bank, name), before[name]), name
    assert not bank.are_copies()  # trained experts differ (so a frozen copy of them would not collapse)


@pytest.mark.parametrize("autocast", [False, True])
def test_the_three_dispatches_agree_with_the_merged_weights(autocast):
    bank = _random_deltas(LowRankExperts.upcycle(tiny_vit().blocks[1].mlp, 4, rank=RANK))
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randn(24, bank.dim, generator=generator, requires_grad=True)
    index = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(24)])
    weight = torch.rand(24, 2, generator=generator)
    merged = [bank.dense_mlp(e) for e in range(4)]
    every = torch.stack([mlp(tokens) for mlp in merged], dim=1)
    expected = (every.gather(1, index[..., None].expand(-1, -1, bank.dim)) * weight[..., None]).sum(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outputs = [dispatch(tokens, index, weight, bank) for dispatch in (dispatch_grouped, dispatch_dense_reference)]
        outputs.append(dispatch_padded(tokens, index, weight, bank, capacity=24))
    tolerance = dict(rtol=3e-2, atol=3e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    for output in outputs:
        torch.testing.assert_close(output.float(), expected, **tolerance)
    grads = [torch.autograd.grad(output.float().square().sum(), [tokens, bank.fc1_lora_a, bank.fc2_lora_b])
             for output in outputs]
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, **tolerance)


def test_bf16_shared_weights_keep_every_delta_and_bias_gradient():
    """With ``bsr.frozen_dtype: bf16`` the shared copy is stored low even while the deltas train, and the trainable
    biases still get their gradients (the low-precision matmul gives its own bias none)."""
    from moebsr.model.frozen_storage import store_frozen_weights
    _, plain = _pair()
    _random_deltas(plain.blocks[3].mlp.experts)  # B != 0, so A has a gradient too
    stored = copy.deepcopy(plain)
    assert "backbone.blocks.3.mlp.experts" in store_frozen_weights(stored, "bf16")
    bank = stored.blocks[3].mlp.experts
    assert bank.fc1_weight.dtype == torch.bfloat16 and bank.fc1_lora_a.dtype == torch.float32
    grads = [torch.autograd.grad(training_loss(model, images(8), LABELS), list(model.trainable_parameters()))
             for model in (plain, stored)]
    names = [name for name, p in plain.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, *grads):
        assert b.abs().sum() > 0 or a.abs().sum() == 0, name
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99, name


def test_frozen_low_rank_mixtures_collapse_and_prune_to_their_merged_experts():
    from moebsr.model.frozen_experts import collapse_frozen_experts
    from moebsr.model.prune import pruned_layer
    _, low = _pair()
    collapsed = copy.deepcopy(low)
    assert collapse_frozen_experts(collapsed) == [1]  # block 1 is frozen and upcycled: its deltas are all zero
    torch.manual_seed(0)
    batch = images(8)
    losses = [training_loss(model, batch, LABELS, aux_weight=0.0) for model in (low, collapsed)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    one_task = tiny_moevit({"a": 10}, moe=dict(blocks=[1, 3], num_experts=4, top_k=2, expert_rank=RANK))
    layer = one_task.blocks[3].mlp  # a pruned router serves one task
    _random_deltas(layer.experts)
    tokens = torch.randn(1, 10, layer.experts.dim)
    kept = pruned_layer(layer, [2, 0]).experts
    assert isinstance(kept, LowRankExperts) and kept.num_experts == 2
    for new, old in ((0, 2), (1, 0)):
        torch.testing.assert_close(kept.forward_expert(new, tokens[0]), layer.experts.forward_expert(old, tokens[0]))
    lone = pruned_layer(layer, [1])
    torch.testing.assert_close(lone(tokens[0]), layer.experts.forward_expert(1, tokens[0]), rtol=1e-5, atol=1e-6)
    # with the shared weight stored in bf16 the delta is merged in fp32, not rounded away
    from moebsr.model.frozen_storage import store_frozen_weights
    store_frozen_weights(one_task, "bf16")
    assert layer.experts.fc1_weight.dtype == torch.bfloat16
    lone = pruned_layer(layer, [1])
    torch.testing.assert_close(lone(tokens[0]), layer.experts.forward_expert(1, tokens[0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("override, message", [
    ("moe.expert_rank=0", r"^moe.expert_rank: 0 is invalid; accepted: an integer >= 1 or null$"),
    ("moe.hidden_features=64", r"^moe.expert_rank: low-rank experts are deltas of the dense MLP on the torch backend, "
                               r"so moe.hidden_features=64 cannot be; accepted: moe.hidden_features=null, or "
                               r"moe.expert_rank=null$"),
])
def test_bad_expert_ranks_are_one_line(override, message):
    from run_helpers import QUICKSTART

    from moebsr.config import ConfigError, load_config
    from moebsr.training.build import check_config_against_model
    with pytest.raises(ConfigError, match=message):
        check_config_against_model(load_config(QUICKSTART, ["moe.expert_rank=4", override]))


def test_tutel_is_refused_with_low_rank_experts():
    from moebsr.model.spec import MoESpec
    with pytest.raises(ValueError, match=r"^moe.expert_rank: .*so moe.backend=tutel cannot be; accepted: "
                                         r"moe.backend=torch, or moe.expert_rank=null$"):
        MoESpec(expert_rank=4, backend="tutel").validate(12)


def test_a_run_with_low_rank_experts_trains_less_saves_and_loads_back(tmp_path):
    """The config key reaches the model: the run's trainable count is the low-rank one, its saved file holds one
    shared weight per MoE layer, and the folder evaluates to the run's own metrics."""
    from run_helpers import QUICKSTART, short_run_overrides
    from safetensors import safe_open

    from moebsr.config import load_config
    from moebsr.training.evaluate import evaluate_run
    from moebsr.training.loop import train
    common = ["logging.trackers=[none]", "tasks=[digits]", "train.sampler=round_robin"]
    result = train(load_config(QUICKSTART, short_run_overrides(tmp_path / "run", 2, ["moe.expert_rank=2", *common])))
    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as weights:
        shape = weights.get_slice("backbone.blocks.3.mlp.experts.fc1_weight").get_shape()
        assert len(shape) == 2 and "backbone.blocks.3.mlp.experts.fc1_lora_a" in set(weights.keys())
    assert evaluate_run(str(tmp_path / "run"), max_examples=160) == result.metrics
    # a pruned task model keeps the low-rank banks it prunes; its folder evaluates to what the export measured
    from moebsr.deploy.exporter import export_task
    onnx = all(importlib.util.find_spec(name) for name in ("onnxruntime", "onnxscript"))
    report = export_task(tmp_path / "run", "digits", tmp_path / "digits", prune=True, threshold=0.2,
                         fmt="onnx" if onnx else "safetensors")
    assert report.section["moe_parameters"]["task_model"] < report.section["moe_parameters"]["multitask"]
    assert not onnx or report.section["onnx"]["max_abs_diff"] < 1e-4
    assert evaluate_run(str(tmp_path / "digits"))["digits"] == report.metrics
    from moebsr.training.build import model_from_config
    from moebsr.training.recipe import describe_recipe
    config = load_config(QUICKSTART, ["moe.expert_rank=2", "model.checkpoint=null", "tasks=[digits]"])
    assert "8 experts (rank-2 deltas of one MLP), top-2" in describe_recipe(config, model_from_config(config,
                                                                                                  {"digits": 10}))


def test_recomputing_low_rank_experts_gives_identical_results():
    _, plain = _pair()
    _random_deltas(plain.blocks[3].mlp.experts)
    recomputed = copy.deepcopy(plain)
    for block in recomputed.blocks:
        if block.is_moe:
            block.mlp.recompute_experts = True
    batch = images(8)
    losses = [training_loss(model, batch, LABELS) for model in (plain, recomputed)]
    assert torch.equal(losses[0], losses[1])
    grads = [torch.autograd.grad(loss, list(model.trainable_parameters())) for loss, model in zip(losses,
                                                                                                 (plain, recomputed))]
    for a, b in zip(*grads):
        assert torch.equal(a, b)
