"""EVA / EVA-02 backbones: upcycled SwiGLU experts, rotary positions carried through token dropping, BSR, refusals."""

import copy

import pytest
import timm
import torch
from numerics import GRADIENTS, assert_close_at_scale
from timm.layers import SwiGLU
from tiny_models import images

from moebsr.errors import is_user_error
from moebsr.model import UnsupportedModelError, create_moevit
from moebsr.model.eva import eva_attention_with_cls_scores
from moebsr.model.gated_experts import GatedExperts

TINY_EVA = dict(img_size=32, patch_size=4, depth=4, embed_dim=64, num_heads=2)
# eva02_tiny: fused qkv with q/v biases, packed GluMlp (SwiGLU), class token, avg pool + fc_norm;
# eva02_base: separate q/k/v projections, SwiGLU with an inner LayerNorm (scale_mlp);
# the rope ViT: no class token (one register), a plain GELU Mlp, layer scales gamma_1/gamma_2
VARIANTS = {
    "eva02_tiny": ("eva02_tiny_patch14_224", {}),
    "eva02_base_scale_mlp": ("eva02_base_patch14_224", {}),
    "rope_reg1_no_class_token": ("vit_medium_patch16_rope_reg1_gap_256", {}),
    "eva02_tiny_layer_scale": ("eva02_tiny_patch14_224", dict(init_values=0.5)),
    "dinov3_four_registers": ("vit_small_patch16_dinov3", {}),  # class token + 4 registers, DINOv3's rotary table
}
MOE = dict(num_experts=4, top_k=2, renormalize=True)


def tiny_eva(variant: str = "eva02_tiny", seed: int = 0) -> torch.nn.Module:
    name, overrides = VARIANTS[variant]
    torch.manual_seed(seed)
    dense = timm.create_model(name, pretrained=False, num_classes=0, **{**TINY_EVA, **overrides})
    with torch.no_grad():  # timm zeroes these at init: random values make the copies' equality meaningful
        for parameter_name, parameter in dense.named_parameters():
            if parameter_name.endswith(("bias", "gamma_1", "gamma_2")) or ".norm." in parameter_name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return dense.eval()


def moe_from(dense: torch.nn.Module, tasks: dict = None, **kwargs) -> torch.nn.Module:
    kwargs.setdefault("moe", dict(MOE, blocks=[1, 3]))
    return create_moevit(copy.deepcopy(dense), tasks or {"a": 3, "b": 5}, **kwargs).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_moe_eva_with_expert_copies_equals_the_dense_eva(variant):
    dense = tiny_eva(variant)
    model = moe_from(dense)
    assert model.moe_blocks == (1, 3)
    expected, features, task_rows = assert_features_are_the_dense_evas(model, dense)
    with torch.no_grad():
        assert_close_at_scale(model.forward_heads(features, task_rows)["a"],
                              model.heads["a"](dense.forward_head(expected, pre_logits=True)))


def assert_features_are_the_dense_evas(model: torch.nn.Module, dense: torch.nn.Module) -> tuple:
    """Every task's features equal the dense model's on 3 images; returns (dense features, features, task rows)."""
    x = images(3)
    with torch.no_grad():
        expected = dense.forward_features(x)
        features, task_rows = model.forward_features(x, ["a", "b"])
    for task, start, end in task_rows:
        assert_close_at_scale(features[start:end], expected, msg=task)
    return expected, features, task_rows


def test_swiglu_experts_are_copies_and_padded_dispatch_agrees():
    dense = tiny_eva("eva02_base_scale_mlp")
    model = moe_from(dense, moe=dict(MOE, blocks=[2], capacity_factor=4.0, dispatch="padded"))
    experts = model.blocks[2].mlp.experts
    mlp = dense.blocks[2].mlp
    assert isinstance(mlp, SwiGLU) and isinstance(experts, GatedExperts)
    for e in range(4):
        assert torch.equal(experts.fc1_gate_weight[e], mlp.fc1_g.weight)
        assert torch.equal(experts.fc1_weight[e], mlp.fc1_x.weight)
        assert torch.equal(experts.norm_weight[e], mlp.norm.weight) and experts.norm_eps == mlp.norm.eps
    assert {"backbone.blocks.2.mlp.experts.norm_weight", "backbone.blocks.2.mlp.experts.fc1_gate_bias"} <= \
        model.no_weight_decay()  # the experts' inner norms and biases take no weight decay, as the dense ones
    with torch.no_grad():
        assert_close_at_scale(model.forward_features(images(2), "a")[0], dense.forward_features(images(2)))


def _captured_attention(attn: torch.nn.Module, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """timm's own EvaAttention output and its softmaxed attention (the input of its attn_drop, unfused path)."""
    captured = []
    handle = attn.attn_drop.register_forward_hook(lambda module, args, out: captured.append(args[0]))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        out = attn(x, rope=rope)
    finally:
        attn.fused_attn = fused
        handle.remove()
    return out, captured[0]


@pytest.mark.parametrize("fused", [True, False])
def test_cls_scores_come_from_the_rotated_queries_and_keys_timm_uses(fused):
    dense = tiny_eva()
    block = dense.blocks[1]
    x, rope = dense._pos_embed(dense.patch_embed(images(2)))
    normed = block.norm1(x)
    expected_out, weights = _captured_attention(block.attn, normed, rope)
    block.attn.fused_attn = fused
    with torch.no_grad():
        out, scores = eva_attention_with_cls_scores(block.attn, normed, rope, num_prefix_tokens=1)
    assert_close_at_scale(out, expected_out)
    assert_close_at_scale(scores, weights[:, :, 0, 1:].mean(dim=1))
    unrotated = eva_attention_with_cls_scores(block.attn, normed, None, num_prefix_tokens=1)[1]
    assert not torch.allclose(unrotated, scores, rtol=1e-3, atol=1e-6)  # the rope really changes the ranking


def _reference_with_dropping(dense: torch.nn.Module, x: torch.Tensor, drops: dict, fuse: bool) -> torch.Tensor:
    """timm's own EvaBlocks on the kept tokens, each kept token with its own patch's rope row (gathered here), a
    fused token with the identity rotation; the kept tokens are the top of CLS attention read from timm's softmax."""
    prefix = dense.num_prefix_tokens
    tokens, table = dense._pos_embed(dense.patch_embed(x))
    tokens = dense.norm_pre(tokens)
    rope = table.expand(x.shape[0], *table.shape)
    for index, block in enumerate(dense.blocks):
        if index not in drops:
            tokens = block(tokens, rope=rope[:, None])
            continue
        attn_out, weights = _captured_attention(block.attn, block.norm1(tokens), rope[:, None])
        tokens = tokens + (attn_out if block.gamma_1 is None else block.gamma_1 * attn_out)
        scores = weights[:, :, 0, prefix:].mean(dim=1) if dense.cls_token is not None \
            else weights[:, :, :, prefix:].mean(dim=(1, 2))
        patches = tokens[:, prefix:]
        keep = -(-patches.shape[1] * drops[index] // 1)
        kept = scores.topk(int(keep), dim=1).indices.sort(dim=1).values
        parts = [tokens[:, :prefix], patches.gather(1, kept[..., None].expand(-1, -1, patches.shape[-1]))]
        rows = [rope.gather(1, kept[..., None].expand(-1, -1, rope.shape[-1]))]
        if fuse:
            dropped = scores.scatter(1, kept, 0.0)
            parts.append((dropped[..., None] * patches).sum(dim=1, keepdim=True))
            half = rope.shape[-1] // 2
            rows.append(torch.cat([torch.zeros(x.shape[0], 1, half), torch.ones(x.shape[0], 1, half)], dim=-1))
        tokens, rope = torch.cat(parts, dim=1), torch.cat(rows, dim=1)
        mlp_out = block.mlp(block.norm2(tokens))
        tokens = tokens + (mlp_out if block.gamma_2 is None else block.gamma_2 * mlp_out)
    return dense.norm(tokens)


@pytest.mark.parametrize("variant", ["eva02_tiny", "rope_reg1_no_class_token", "eva02_tiny_layer_scale",
                                     "dinov3_four_registers"])
@pytest.mark.parametrize("fuse", [False, True])
def test_dropping_carries_each_kept_tokens_rotary_position(variant, fuse):
    dense = tiny_eva(variant)
    x = images(3)
    model = moe_from(dense, moe=dict(MOE, blocks=[3]), token_drop=dict(blocks=[1, 2], keep_rate=0.5, fuse=fuse))
    with torch.no_grad():
        expected = _reference_with_dropping(dense, x, {1: 0.5, 2: 0.5}, fuse)
        features, task_rows = model.forward_features(x, ["a", "b"])
    patches = 18 if fuse else 16  # 64 -> 32 (+1 fused) -> 17 (+1 fused); unfused 64 -> 32 -> 16
    assert features.shape[1] == expected.shape[1] == dense.num_prefix_tokens + patches
    for task, start, end in task_rows:
        assert_close_at_scale(features[start:end], expected, msg=task)
    kept = model.last_kept_tokens[2]["a"]
    assert torch.equal(kept, model.last_kept_tokens[2]["b"]) and kept.shape == (3, patches)


def test_keep_rate_one_equals_the_dense_eva():
    dense = tiny_eva()
    model = moe_from(dense, token_drop=dict(blocks=[1, 2], keep_rate=1.0))
    with torch.no_grad():
        assert_close_at_scale(model.forward_features(images(2), "a")[0], dense.forward_features(images(2)))


def test_frozen_trunk_state_carries_the_rope_rows_into_the_trainable_blocks():
    from moebsr.training.trunk_cache import TrunkCache

    model = moe_from(tiny_eva(), bsr=dict(preset="last_k", last_k=1), token_drop=dict(blocks=[1, 2], keep_rate=0.5))
    assert model.first_grad_block() == 3
    x = images(3)
    cache = TrunkCache(["a", "b"], num_keys=3, views=0, dtype="fp32", max_bytes=1 << 24, device=torch.device("cpu"))
    with torch.no_grad():
        expected = model(x, ["a", "b"])
        state = model.forward_frozen_trunk(x, ["a", "b"])
        # split per task at block 1's MoE MLP (2 x 3 rows); 64 patches -> 32 + fused -> 17 + fused
        assert state.selection.rope is not None and state.selection.rope.shape[:2] == (6, 18)
        computed = cache.forward(model, model, x, torch.arange(3), 0)
        read_back = cache.forward(model, model, x, torch.arange(3), 0)
    assert cache.hits == 3
    for outputs in (model(x, ["a", "b"], trunk=state), computed, read_back):
        for task in expected:
            assert_close_at_scale(outputs[task], expected[task], msg=task)


def test_one_training_step_reaches_exactly_the_bsr_trainable_parameters():
    model = moe_from(tiny_eva("eva02_tiny_layer_scale"), bsr="paper", token_drop=dict(blocks=[1, 2], keep_rate=0.5))
    model.train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # paper preset at depth 4: blocks 0, 2, 3 with their layer scales, the final norms (fc_norm for avg pool), heads
    assert "backbone.blocks.0.gamma_1" in trainable and "backbone.blocks.2.gamma_2" in trainable
    assert "backbone.fc_norm.weight" in trainable and "backbone.blocks.3.mlp.experts.fc1_gate_weight" in trainable
    assert not any(name.startswith(("backbone.blocks.1.", "backbone.patch_embed.", "backbone.pos_embed",
                                    "backbone.cls_token")) for name in trainable)
    outputs = model(images(4), ["a", "b"])
    (sum(o.logsumexp(-1).sum() for o in outputs.values()) + model.aux_loss()).backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_bsr_sublayers_map_to_the_eva_blocks_modules_and_the_frozen_prefix_runs_without_autograd():
    model = moe_from(tiny_eva("eva02_tiny_layer_scale"), bsr=dict(preset="custom", trainable_blocks=[2],
                                                                  sublayers=["attn"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    block_trainable = {name for name in trainable if name.startswith("backbone.blocks.")}
    assert block_trainable == {f"backbone.blocks.2.{name}" for name, _ in model.blocks[2].attn.named_parameters(
        prefix="attn")} | {"backbone.blocks.2.gamma_1"}
    assert model.first_grad_block() == 2
    seen = []
    for index in range(4):
        model.blocks[index].norm1.register_forward_hook(
            lambda module, args, out, index=index: seen.append((index, torch.is_grad_enabled())))
    model.train()(images(2), "a")
    assert dict(seen) == {0: False, 1: False, 2: True, 3: True}
    full = moe_from(tiny_eva(), bsr="all")
    assert full.first_grad_block() == -1 and full.backbone.pos_embed.requires_grad


def test_eval_forward_gives_each_task_its_logits():
    model = moe_from(tiny_eva(), token_drop=dict(keep_rate=0.5))
    with torch.no_grad():
        outputs = model(images(5), ["a", "b"])
    assert {task: tuple(o.shape) for task, o in outputs.items()} == {"a": (5, 3), "b": (5, 5)}


def test_pruned_gated_experts_stay_exact_down_to_a_dense_swiglu():
    from moebsr.model.prune import pruned_layer

    model = moe_from(tiny_eva("eva02_base_scale_mlp"), tasks={"a": 3})
    layer = model.blocks[1].mlp
    tokens = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = layer(tokens, [("a", 0, 2)])
        two = pruned_layer(layer, [0, 2])
        one = pruned_layer(layer, [1])
        assert isinstance(two.experts, GatedExperts) and two.experts.num_experts == 2 and isinstance(one, SwiGLU)
        assert_close_at_scale(one(tokens), expected)
        assert_close_at_scale(two(tokens, [("a", 0, 2)]), expected)


def test_an_eva02_pruned_to_one_expert_per_layer_loads_into_the_timm_model_of_its_name():
    """eva02_tiny's MLP is a packed GluMlp: a layer pruned to one expert must become one again (not a SwiGLU), or
    the exported backbone's state dict would not load into timm's eva02_tiny."""
    from moebsr.model.prune import prune_experts

    dense = tiny_eva()
    model = moe_from(dense, tasks={"a": 3})
    prune_experts(model, {1: [2], 3: [0]})
    assert not model.moe_blocks
    fresh = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=0, **TINY_EVA).eval()
    fresh.load_state_dict(model.backbone.state_dict())
    with torch.no_grad():
        assert_close_at_scale(fresh.forward_features(images(2)), dense.forward_features(images(2)))


def test_an_eva_task_with_dropping_and_gated_experts_exports_to_onnx(tmp_path):
    from moebsr.deploy.onnx_export import check_onnx, export_onnx

    model = moe_from(tiny_eva(), tasks={"a": 3}, token_drop=dict(blocks=[1, 2], keep_rate=0.5))
    export_onnx(model, "a", tmp_path / "eva.onnx", images(2))
    check = check_onnx(tmp_path / "eva.onnx", model, "a", images(3))
    assert check.max_abs_diff <= check.tolerance, check


@pytest.mark.parametrize("name, message", [  # the other families' refusals: tests/test_compat_models.py
    ("vit_small_patch16_rope_mixed_224", r"^model: .* uses a rotary table per block \(rope_type='mixed'\)"),
])
def test_unsupported_families_are_refused_in_one_line_naming_what_works(name, message):
    with pytest.raises(UnsupportedModelError, match=message) as refused:
        create_moevit(name, {"a": 2}, img_size=32, patch_size=16, depth=2, embed_dim=32, num_heads=2)
    text = str(refused.value)
    assert is_user_error(refused.value) and "\n" not in text
    assert "EVA/EVA-02" in text


def test_accepted_families_name_eva_and_eva_models_pass_the_name_check():
    from moebsr.model.factory import check_model_name

    assert check_model_name("eva02_tiny_patch14_224") == "eva02_tiny_patch14_224"
    with pytest.raises(UnsupportedModelError, match=r"EVA/EVA-02"):
        check_model_name("resnet18")
    with pytest.raises(UnsupportedModelError, match=r"Eva models \(EVA/EVA-02"):
        create_moevit(torch.nn.Linear(2, 2), {"a": 2})


def test_an_eva_with_another_attention_runs_dense_but_refuses_dropping_in_one_line():
    dense = tiny_eva("rope_reg1_no_class_token")
    torch.manual_seed(0)
    other = timm.create_model("vit_small_patch16_rope_224", pretrained=False, num_classes=0, **TINY_EVA).eval()
    model = moe_from(other)
    with torch.no_grad():
        assert_close_at_scale(model.forward_features(images(2), "a")[0], other.forward_features(images(2)))
    with pytest.raises(UnsupportedModelError, match=r"^token_drop: Eva blocks with AttentionRope attention are not "
                                                    r"supported; accepted: timm.models.eva.EvaAttention"):
        moe_from(other, token_drop=dict(blocks=[1], keep_rate=0.5))
    assert moe_from(dense, token_drop=dict(blocks=[1], keep_rate=0.5)).token_drop_blocks == (1,)


def test_gated_experts_refuse_tutel_and_qkv_adapters_in_one_line():
    from moebsr.model import apply_task_adapters

    with pytest.raises(UnsupportedModelError, match=r"^moe.backend: tutel cannot run GatedExperts"):
        moe_from(tiny_eva(), moe=dict(MOE, blocks=[1], backend="tutel"))
    model = moe_from(tiny_eva(), moe=dict(MOE, blocks=[3]))
    with pytest.raises(UnsupportedModelError, match=r"^adapters.modules: EVA's fused qkv with q/v biases"):
        apply_task_adapters(model, ["a", "b"], [1], modules=("qkv",))
    assert apply_task_adapters(model, ["a", "b"], [1], modules=("proj", "fc1")) == [
        "backbone.blocks.1.attn.proj", "backbone.blocks.1.mlp.fc1"]


def test_a_gradient_check_of_the_gated_experts_against_the_dense_swiglu():
    """Copies of one SwiGLU, renormalised top-k: the MoE layer's gradient w.r.t. its input is the dense one's."""
    dense = tiny_eva("eva02_base_scale_mlp")
    model = moe_from(dense, moe=dict(MOE, blocks=[1]))
    tokens = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    dense_tokens = tokens.detach().clone().requires_grad_(True)
    model.blocks[1].mlp(tokens, [("a", 0, 2)]).square().sum().backward()
    dense.blocks[1].mlp(dense_tokens).square().sum().backward()
    assert_close_at_scale(tokens.grad, dense_tokens.grad, rel=GRADIENTS)


def test_a_config_names_an_eva_and_its_timm_kwargs_are_checked_against_eva():
    from pathlib import Path

    from moebsr.config import ConfigError, load_config
    from moebsr.training.build import check_config_against_model, check_timm_kwargs

    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    check_config_against_model(load_config(quickstart, ["model.name=eva02_tiny_patch14_224",
                                                        "model.timm_kwargs.init_values=0.1"]))
    check_timm_kwargs({"use_rot_pos_emb": True, "swiglu_mlp": True}, "eva02_tiny_patch14_224")
    with pytest.raises(ConfigError, match=r"^model.timm_kwargs: unknown key 'use_rot_pos_emb'; accepted: "):
        check_timm_kwargs({"use_rot_pos_emb": True}, "vit_tiny_patch16_224")


@pytest.mark.parametrize("variant", ["eva02_tiny", "eva02_base_scale_mlp"])
def test_collapsed_frozen_gated_experts_are_the_dense_evas_mlp_again(variant):
    """moe.collapse_frozen on EVA-02: a frozen mixture of SwiGLU copies becomes the SwiGLU/GluMlp it was upcycled
    from (block 1 here; block 3 trains and stays a mixture), and the features are the dense model's."""
    from moebsr.model.frozen_experts import collapse_frozen_experts
    dense = tiny_eva(variant)
    model = moe_from(dense, bsr=dict(preset="custom", trainable_blocks=[3]))
    assert collapse_frozen_experts(model) == [1] and model.moe_blocks == (3,)
    assert type(model.blocks[1].mlp) is type(dense.blocks[1].mlp)
    assert_features_are_the_dense_evas(model, dense)
