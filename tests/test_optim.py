"""What the optimizer and schedule do with the config: layer decay, layer groups, weight decay by role."""

import pytest
from timm.models import group_parameters
from tiny_models import TINY_VIT, tiny_moevit, tiny_vit

from moebsr.config import TrainConfig
from moebsr.training.optim import build_optimizer, build_scheduler

DEPTH = TINY_VIT["depth"]


def _layer_ids(model) -> dict[str, int]:
    return group_parameters(model, model.group_matcher(coarse=False), reverse=True)


def test_every_parameter_gets_the_layer_id_timm_gives_it_in_the_dense_vit():
    model = tiny_moevit(bsr="all")
    ours, dense = _layer_ids(model), _layer_ids(tiny_vit())
    # timm: stem (cls/pos embed, patch embed, norm_pre) 0, block i -> i + 1, final norm with the last block,
    # the head (unmatched) last
    assert dense["pos_embed"] == dense["patch_embed.proj.weight"] == dense["cls_token"] == 0
    assert dense["norm.weight"] == DEPTH
    for name, layer_id in dense.items():
        if f"backbone.{name}" in ours:  # the dense MLPs of MoE blocks became experts
            assert ours[f"backbone.{name}"] == layer_id, name
    for name, layer_id in ours.items():
        if ".mlp." in name:  # experts and gates of MoE block i: block i's group
            assert layer_id == int(name.split(".")[2]) + 1, name
        if name.startswith("heads."):
            assert layer_id == DEPTH + 1, name
    assert any(".experts." in name for name in ours) and any(".mlp.fc1." in name for name in ours)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_group_learning_rates_follow_layer_decay(optimizer):
    model = tiny_moevit(bsr="all")
    train = TrainConfig(optimizer=optimizer, lr=1e-2, layer_decay=0.5, warmup_steps=2, steps=10)
    opt = build_optimizer(model, train)
    scheduler = build_scheduler(opt, train)
    layer_of = _layer_ids(model)
    group_of = {id(p): group for group in opt.param_groups for p in group["params"]}
    for _ in range(4):  # through warm-up into the cosine
        multiplier = opt.param_groups[0]["lr"] / (train.lr * opt.param_groups[0]["lr_scale"])
        for name, parameter in model.named_parameters():
            expected = train.lr * multiplier * 0.5 ** (DEPTH + 1 - layer_of[name])
            assert group_of[id(parameter)]["lr"] == pytest.approx(expected, rel=1e-9), name
        opt.step()
        scheduler.step()
    lrs = {layer_of[n]: group_of[id(p)]["lr"] for n, p in model.named_parameters()}
    assert lrs[0] == pytest.approx(lrs[DEPTH + 1] * 0.5 ** (DEPTH + 1))  # the stem's LR really is smaller


def test_without_layer_decay_every_group_has_the_scheduled_lr():
    model = tiny_moevit(bsr="all")
    train = TrainConfig(lr=1e-3, warmup_steps=0, steps=10)
    opt = build_optimizer(model, train)
    build_scheduler(opt, train)
    assert {group["lr"] for group in opt.param_groups} == {1e-3}


@pytest.mark.parametrize("layer_decay", [None, 0.75])
def test_weight_decay_spares_biases_norms_and_tokens_by_role(layer_decay):
    model = tiny_moevit(bsr="all")
    opt = build_optimizer(model, TrainConfig(weight_decay=0.05, layer_decay=layer_decay))
    decay = {id(p): group["weight_decay"] for group in opt.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    exempt = ["backbone.blocks.0.mlp.experts.fc1_bias", "backbone.blocks.0.mlp.experts.fc2_bias",  # stacked [E, .]
              "backbone.blocks.1.mlp.fc1.bias", "backbone.blocks.1.norm1.weight", "backbone.norm.weight",
              "backbone.pos_embed", "backbone.cls_token", "heads.a.bias"]
    decayed = ["backbone.blocks.0.mlp.experts.fc1_weight", "backbone.blocks.0.mlp.router.gates.a.weight",
               "backbone.blocks.1.attn.qkv.weight", "backbone.patch_embed.proj.weight", "heads.a.weight"]
    assert named["backbone.blocks.0.mlp.experts.fc1_bias"].dim() == 2
    for name in exempt:
        assert decay[id(named[name])] == 0.0, name
    for name in decayed:
        assert decay[id(named[name])] == 0.05, name
    assert len(decay) == len(named)  # every trainable parameter is in a group


def test_frozen_parameters_are_not_optimised():
    model = tiny_moevit(bsr="paper")
    opt = build_optimizer(model, TrainConfig(layer_decay=0.75))
    optimised = {id(p) for group in opt.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(optimised) < len(list(model.parameters()))
