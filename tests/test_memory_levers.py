"""Switches that trade compute for memory: each gives the plain path's results and stores less for backward."""

import pytest
import torch
from tiny_models import distinct_experts, images, tiny_moevit

from moebsr.analysis.profiling import saved_activation_bytes, synthetic_labels, training_loss

LABELS = synthetic_labels({"a": 10, "b": 3}, 8)


def _model(**moe):
    model = distinct_experts(tiny_moevit(moe=dict(num_experts=4, top_k=2, **moe), token_drop=dict(keep_rate=0.5)))
    model.train()
    return model


def test_recomputing_experts_gives_identical_results_and_stores_less():
    plain, recomputed = _model(), _model(recompute_experts=True)
    batch = images(8)
    losses = [training_loss(model, batch, LABELS) for model in (plain, recomputed)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    for (name, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters()):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad)), name
    saved_plain, saved_recomputed = (saved_activation_bytes(model, batch, LABELS) for model in (plain, recomputed))
    # measured 0.44x: the top-2 expert hidden states (4x width each) of the 3 MoE layers are no longer kept
    assert saved_recomputed < 0.6 * saved_plain, (saved_recomputed, saved_plain)


def test_recompute_experts_needs_the_torch_backend():
    from moebsr.model.spec import MoESpec
    with pytest.raises(ValueError, match=r"^moe.recompute_experts: only the torch backend .*accepted: moe.backend="
                                         r"torch, or moe.recompute_experts=false$"):
        MoESpec(recompute_experts=True, backend="tutel").validate(12)


def _frozen_model(frozen_dtype, sublayers=("attn", "router", "norm")):
    """BSR at blocks 1 and 3 with the experts frozen (the experts of trainable blocks are cast too), dropping on."""
    from moebsr.model.frozen_storage import store_frozen_weights
    model = tiny_moevit(moe=dict(blocks=[1, 3], num_experts=4, top_k=2), token_drop=dict(keep_rate=0.5),
                        bsr=dict(preset="custom", trainable_blocks=[1, 3], sublayers=list(sublayers)))
    model = distinct_experts(model)
    cast = store_frozen_weights(model, frozen_dtype)
    return model.train(), cast


def _loss_and_grads(model, precision="no"):
    loss = training_loss(model, images(8), LABELS, precision=precision)
    grads = torch.autograd.grad(loss, list(model.trainable_parameters()))
    return loss, grads


def test_frozen_weights_in_bf16_change_nothing_under_bf16_autocast():
    """autocast casts an fp32 weight to bf16 for every matmul anyway: storing it in bf16 gives the same numbers."""
    (plain, _), (stored, cast) = _frozen_model("fp32"), _frozen_model("bf16")
    assert "backbone.blocks.0.attn.qkv" in cast and "backbone.blocks.1.mlp.experts" in cast
    assert "backbone.patch_embed.proj" in cast and not any("router" in name or "head" in name for name in cast)
    plain_loss, plain_grads = _loss_and_grads(plain, "bf16")
    stored_loss, stored_grads = _loss_and_grads(stored, "bf16")
    assert torch.equal(plain_loss, stored_loss)
    for a, b in zip(plain_grads, stored_grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("frozen_dtype, min_cosine", [("bf16", 0.99), ("fp16", 0.9999)])
def test_frozen_weights_in_half_precision_stay_close_in_fp32_training_and_halve_their_bytes(frozen_dtype, min_cosine):
    (plain, _), (stored, _) = _frozen_model("fp32"), _frozen_model(frozen_dtype)
    plain_loss, plain_grads = _loss_and_grads(plain)
    stored_loss, stored_grads = _loss_and_grads(stored)
    # the stated tolerance: loss within 0.2 %, every trainable gradient at cosine > 0.99 (bf16: measured 0.9930 at
    # worst, the frozen weights rounded to an 8-bit mantissa) or > 0.9999 (fp16: 1.0000) to the fp32 one
    assert abs(stored_loss.item() - plain_loss.item()) < 0.002 * abs(plain_loss.item())
    for a, b in zip(plain_grads, stored_grads):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > min_cosine
    assert all(p.dtype == torch.float32 for p in stored.trainable_parameters())

    def frozen_bytes(model):
        return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    frozen_matmul = sum(p.numel() for name, p in plain.named_parameters()  # matmul weights; biases stay fp32
                        if not p.requires_grad and name.endswith("weight") and "norm" not in name)
    assert frozen_bytes(plain) - frozen_bytes(stored) == 2 * frozen_matmul
    assert saved_activation_bytes(stored, images(8), LABELS) <= saved_activation_bytes(plain, images(8), LABELS)


@pytest.mark.parametrize("bias_trains", [False, True])
def test_a_frozen_bf16_expert_bank_is_cast_per_matmul_and_only_the_bank_is_kept_for_backward(bias_trains):
    """The batched expert dispatch outside autocast (fp32 training, or low-precision scoring): the same outputs and
    gradients as casting the bank up front, without saving that fp32 copy (on DeiT-S's 3 mixtures, 154 MB a pass)."""
    from moebsr.analysis.profiling import counting_saved_tensors
    from moebsr.model.experts import Experts
    torch.manual_seed(0)
    bank = Experts(4, 8, 16, torch.nn.GELU())
    bank.requires_grad_(False)
    bank.fc1_bias.requires_grad_(bias_trains)
    bank.fc1_weight.data, bank.fc2_weight.data = bank.fc1_weight.data.bfloat16(), bank.fc2_weight.data.bfloat16()
    slots = torch.randn(4, 5, 8, requires_grad=True)
    with counting_saved_tensors(bank) as saved:
        out = bank.forward_batched(slots)
    out.square().sum().backward()
    reference_slots = slots.detach().clone().requires_grad_(True)
    fc1, fc2 = bank.fc1_weight.float(), bank.fc2_weight.float()
    hidden = bank.act(torch.baddbmm(bank.fc1_bias.unsqueeze(1), reference_slots, fc1.transpose(1, 2)))
    reference = torch.baddbmm(bank.fc2_bias.unsqueeze(1), hidden, fc2.transpose(1, 2))
    bias_gradient = bank.fc1_bias.grad
    bank.fc1_bias.grad = None
    reference.square().sum().backward()
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    torch.testing.assert_close(slots.grad, reference_slots.grad, rtol=1e-6, atol=1e-7)
    if bias_trains:
        torch.testing.assert_close(bias_gradient, bank.fc1_bias.grad, rtol=1e-6, atol=1e-7)
    bank_bytes = (fc1.numel() + fc2.numel()) * 4
    assert sum(saved.values()) < bank_bytes / 2  # the slots and the hidden layer, not an fp32 copy of the bank


def test_frozen_dtype_is_checked():
    from run_helpers import QUICKSTART

    from moebsr.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"^bsr.frozen_dtype: 'int4' is invalid; accepted: fp32, bf16, fp16$"):
        load_config(QUICKSTART, ["bsr.frozen_dtype=int4"])


def test_a_run_with_bf16_frozen_weights_exports_and_loads_back(tmp_path):
    """The export keeps the bf16 frozen weights (half the file for them), and rebuilding the run's model from its
    config casts the same layers, so the export loads strictly and evaluates to the run's own metrics."""
    from run_helpers import QUICKSTART, short_run_overrides
    from safetensors import safe_open

    from moebsr.config import load_config
    from moebsr.training.evaluate import evaluate_run
    from moebsr.training.loop import train
    result = train(load_config(QUICKSTART, short_run_overrides(tmp_path / "run", 2, [
        "logging.trackers=[none]", "bsr.frozen_dtype=bf16", "tasks=[digits]", "train.sampler=round_robin"])))
    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as weights:
        assert weights.get_slice("backbone.blocks.1.attn.qkv.weight").get_dtype() == "BF16"  # block 1: frozen
        assert weights.get_slice("backbone.blocks.0.attn.qkv.weight").get_dtype() == "F32"  # block 0 trains
    assert evaluate_run(str(tmp_path / "run"), max_examples=160) == result.metrics


def _collapsible_pair():
    """MoE at blocks 1 and 3 (upcycled, identical experts), BSR training blocks 0 and 3: block 1's mixture is frozen
    behind a trainable block, so its experts' hidden states are kept for backward."""
    import copy

    from moebsr.model.frozen_experts import collapse_frozen_experts
    plain = tiny_moevit(moe=dict(blocks=[1, 3], num_experts=4, top_k=2), token_drop=dict(blocks=[2], keep_rate=0.5),
                        bsr=dict(preset="custom", trainable_blocks=[0, 3]))
    collapsed = copy.deepcopy(plain)
    assert collapse_frozen_experts(collapsed) == [1]
    return plain.train(), collapsed.train()


def test_collapsing_frozen_upcycled_experts_keeps_outputs_and_gradients_and_costs_less():
    from moebsr.analysis.profiling import count_parameters, training_step_flops
    plain, collapsed = _collapsible_pair()
    assert plain.moe_blocks == (1, 3) and collapsed.moe_blocks == (3,)
    assert collapsed.task_split_point() == plain.task_split_point() == (1, "mlp")  # the same token ranking
    batch = images(8)
    # without the balancing loss: a frozen router's loss still pulls block 0 towards routes that change nothing
    losses = [training_loss(model, batch, LABELS, aux_weight=0.0) for model in (plain, collapsed)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    grads = [torch.autograd.grad(loss, list(model.trainable_parameters()))
             for loss, model in zip(losses, (plain, collapsed))]
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert count_parameters(plain)[0] == count_parameters(collapsed)[0]
    frozen = [count_parameters(model)[1] - count_parameters(model)[0] for model in (plain, collapsed)]
    mlp = sum(p.numel() for p in collapsed.blocks[1].mlp.parameters())
    router = sum(p.numel() for p in plain.blocks[1].mlp.router.parameters())
    assert frozen[0] - frozen[1] == 3 * mlp + router  # 4 copies and the gates -> 1 MLP
    saved = [saved_activation_bytes(model, batch, LABELS) for model in (plain, collapsed)]
    flops = [training_step_flops(model, batch, LABELS) for model in (plain, collapsed)]
    assert saved[1] < saved[0] and flops[1] < flops[0], (saved, flops)


def test_collapse_frozen_is_a_config_key_that_refuses_what_it_cannot_keep_exact():
    from run_helpers import QUICKSTART

    from moebsr.config import ConfigError, load_config
    from moebsr.model.frozen_experts import collapse_frozen_experts
    from moebsr.training.build import check_config_against_model, model_from_config
    heads = {"digits": 10}
    on, off = (model_from_config(load_config(QUICKSTART, [f"moe.collapse_frozen={value}", "model.checkpoint=null",
                                                          "tasks=[digits]"]), heads) for value in ("true", "false"))
    assert off.moe_blocks == (1, 3, 5) and on.moe_blocks == (1, 3, 5)  # the paper preset trains every MoE layer
    partial = ["bsr.preset=custom", "bsr.trainable_blocks=[4,5]", "model.checkpoint=null", "tasks=[digits]"]
    on, off = (model_from_config(load_config(QUICKSTART, [f"moe.collapse_frozen={value}", *partial]), heads)
               for value in ("true", "false"))
    assert on.moe_blocks == (5,) and off.moe_blocks == (1, 3, 5)
    for setting, accepted in [("moe.renormalize=false", "true"), ("moe.capacity_factor=1.5", "null"),
                              ("moe.hidden_features=64", "null")]:
        key = setting.split("=")[0]
        with pytest.raises(ConfigError, match=rf"^moe.collapse_frozen: .*without {setting}; accepted: {key}="
                                              rf"{accepted}, or moe.collapse_frozen=false$"):
            check_config_against_model(load_config(QUICKSTART, ["moe.collapse_frozen=true", setting]))
    with pytest.raises(ValueError, match=r"^moe.collapse_frozen: block 1's frozen experts differ"):
        collapse_frozen_experts(distinct_experts(tiny_moevit(moe=dict(blocks=[1, 3], num_experts=4, top_k=2),
                                                             bsr=dict(preset="custom", trainable_blocks=[3]))))


def test_a_run_with_collapsed_frozen_experts_saves_and_loads_back(tmp_path):
    """The run's model is rebuilt from its config with the same layers collapsed, so its weights load strictly and
    evaluate to the run's own metrics; the saved file holds one MLP for each collapsed layer."""
    from run_helpers import QUICKSTART, short_run_overrides
    from safetensors import safe_open

    from moebsr.config import load_config
    from moebsr.training.evaluate import evaluate_run
    from moebsr.training.loop import train
    result = train(load_config(QUICKSTART, short_run_overrides(tmp_path / "run", 2, [
        "logging.trackers=[none]", "moe.collapse_frozen=true", "bsr.preset=custom", "bsr.trainable_blocks=[3]",
        "tasks=[digits]", "train.sampler=round_robin"])))
    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    # the short run's 4 blocks have MoE at 0, 2 and 3; block 3 trains
    assert {"backbone.blocks.0.mlp.fc1.weight", "backbone.blocks.2.mlp.fc1.weight",
            "backbone.blocks.3.mlp.experts.fc1_weight"} <= names
    assert not any(".mlp.experts." in name for name in names if not name.startswith("backbone.blocks.3."))
    assert evaluate_run(str(tmp_path / "run"), max_examples=160) == result.metrics
