import pytest
import torch
from tiny_models import images, tiny_moevit

from moebsr.model import BSRPlan


def _saved_tensors_by_block(model, tasks=("a", "b")):
    """Count tensors packed for backward while each block runs (-1: the stem, before any block)."""
    current = {"block": -1}
    counts: dict[int, int] = {}

    def pack(tensor):
        counts[current["block"]] = counts.get(current["block"], 0) + 1
        return tensor

    # forward_features calls each block's two halves directly: tag the running block by wrapping them
    for index, block in enumerate(model.blocks):
        for half in ("forward_attention", "forward_mlp"):
            def tagged(*args, _original=getattr(block, half), _index=index):
                current["block"] = _index
                out = _original(*args)
                current["block"] = 99  # after a block: final norm, pooling, heads
                return out
            setattr(block, half, tagged)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(images(), list(tasks))
        sum(o.sum() for o in out.values()).backward()
    finally:
        for block in model.blocks:
            del block.forward_attention, block.forward_mlp
    return counts


def test_paper_plan_trains_only_its_blocks_final_norm_and_heads():
    model = tiny_moevit(bsr="paper")  # depth 4 -> blocks (0, 2, 3)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    for name in trainable:
        assert name.startswith(("backbone.blocks.0.", "backbone.blocks.2.", "backbone.blocks.3.", "backbone.norm.",
                                "heads."))
    assert not any(name.startswith("backbone.blocks.1.") for name in trainable)
    assert "backbone.patch_embed.proj.weight" not in trainable and "backbone.pos_embed" not in trainable


def test_frozen_parameters_get_no_gradient_and_trainable_ones_all_do():
    model = tiny_moevit(bsr=dict(preset="last_k", last_k=2))
    out = model(images(8), ["a", "b"])
    (sum(o.logsumexp(-1).sum() for o in out.values()) + model.aux_loss()).backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


@pytest.mark.parametrize("preset, first", [("last_k", 2), ("paper", 0)])
def test_frozen_prefix_saves_no_activations(preset, first):
    model = tiny_moevit(bsr=dict(preset=preset, last_k=2), token_drop=dict(keep_rate=0.5))
    assert model.first_grad_block() == first
    counts = _saved_tensors_by_block(model)
    assert all(counts.get(i, 0) == 0 for i in range(-1, first)), counts
    assert all(counts.get(i, 0) > 0 for i in range(first, 4)), counts


def test_full_fine_tuning_saves_activations_from_the_stem_on():
    model = tiny_moevit(bsr="all")
    assert model.first_grad_block() == -1
    counts = _saved_tensors_by_block(model)
    assert counts.get(-1, 0) > 0 and all(counts.get(i, 0) > 0 for i in range(4))


def test_sublayer_selection_by_module():
    model = tiny_moevit(bsr=dict(preset="custom", trainable_blocks=[2], sublayers=["router", "norm"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad and not name.startswith("heads.")}
    assert trainable == {"backbone.blocks.2.mlp.router.gates.a.weight", "backbone.blocks.2.mlp.router.gates.b.weight",
                         "backbone.blocks.2.norm1.weight", "backbone.blocks.2.norm1.bias",
                         "backbone.blocks.2.norm2.weight", "backbone.blocks.2.norm2.bias",
                         "backbone.norm.weight", "backbone.norm.bias"}


def test_head_only_plan_runs_the_whole_backbone_without_autograd():
    model = tiny_moevit(bsr="none")
    assert model.first_grad_block() == 4
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "heads.a.weight", "heads.a.bias", "heads.b.weight", "heads.b.bias"}
    features, _ = model.forward_features(images(), ["a"])
    assert features.grad_fn is None


def test_presets_resolve_by_depth():
    assert BSRPlan("paper").resolve(12).trainable_blocks == (3, 7, 11)
    assert BSRPlan("last_k", last_k=3).resolve(12).trainable_blocks == (9, 10, 11)
    assert BSRPlan("all").resolve(4).train_embeddings
    assert BSRPlan("none").resolve(4).trainable_blocks == ()


def _block_outputs(model, x):
    """Each block's output (its MLP half's), for one train-mode forward."""
    outputs = {}
    hooks = [block.drop_path2.register_forward_hook(lambda m, a, o, i=index: outputs.__setitem__(i, o.detach().clone()))
             for index, block in enumerate(model.blocks)]
    model(x, ["a"])
    for hook in hooks:
        hook.remove()
    return outputs


def test_frozen_blocks_are_deterministic_in_training_trainable_ones_keep_stochastic_depth():
    # stochastic depth grows with depth in timm (0 at block 0); blocks 1 and 2 are frozen, block 3 trains
    model = tiny_moevit(bsr=dict(preset="custom", trainable_blocks=[3]), drop_path_rate=0.5).train()
    x = images(64)
    first, second = _block_outputs(model, x), _block_outputs(model, x)
    for frozen in (1, 2):
        assert torch.equal(first[frozen], second[frozen]), frozen
    assert not torch.equal(first[3], second[3])  # the trainable block keeps its regularisation
    assert [block.training for block in model.blocks] == [False, False, False, True]
    assert model.training and model.heads.training


def test_train_and_eval_modes_follow_what_trains():
    model = tiny_moevit(bsr="paper", drop_path_rate=0.1)  # depth 4 -> blocks 0, 2, 3 train
    model.eval()
    assert not any(module.training for module in model.modules())
    model.train()
    assert [block.training for block in model.blocks] == [True, False, True, True]
    assert not model.backbone.patch_embed.training  # the frozen stem
    full = tiny_moevit(bsr="all").train()
    assert all(module.training for module in full.modules())
