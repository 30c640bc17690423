import pytest
import torch
from tiny_models import TINY_VIT, images, tiny_moevit

from moebsr.model import create_moevit


@pytest.mark.parametrize("kwargs, message", [
    (dict(moe=dict(blocks=[1, 9])), r"moe.blocks: block index 9 out of range; accepted: 0..3"),
    (dict(moe=dict(num_experts=4, top_k=5)), r"moe.top_k: 5 is invalid; accepted: 1..moe.num_experts \(4\)"),
    (dict(moe=dict(router="mixed")), r"moe.router: unknown mode 'mixed'; accepted: task, shared"),
    (dict(moe=dict(experts=4)), r"moe: unknown key\(s\) \['experts'\]"),
    (dict(token_drop=dict(keep_rate=0)), r"token_drop.keep_rate: 0 is invalid; accepted: a number in \(0, 1\]"),
    (dict(token_drop=dict(keep_rate=1.5)), r"token_drop.keep_rate: 1.5 is invalid"),
    (dict(token_drop=dict(blocks=[-1])), r"token_drop.blocks: block index -1 out of range"),
    (dict(bsr="most"), r"bsr.preset: unknown preset 'most'; accepted: paper, last_k, all, none, custom"),
    (dict(bsr=dict(preset="last_k", last_k=7)), r"bsr.last_k: 7 is invalid; accepted: 1..4"),
    (dict(bsr=dict(trainable_blocks=[4])), r"bsr.trainable_blocks: block index 4 out of range"),
    (dict(bsr=dict(sublayers=["attn", "ffn"])), r"bsr.sublayers: unknown sub-layer\(s\) \['ffn'\]"),
])
def test_bad_specs_raise_naming_key_value_and_accepted(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_moevit(**kwargs)


def test_unknown_task_at_forward():
    with pytest.raises(ValueError, match=r"tasks: unknown task 'z'; accepted: a, b"):
        tiny_moevit()(images(), ["a", "z"])


def test_unknown_model_and_missing_checkpoint():
    with pytest.raises(ValueError, match="model.name: unknown timm model 'vit_nope'"):
        create_moevit("vit_nope", {"a": 2})
    with pytest.raises(FileNotFoundError, match="model.checkpoint: no file at"):
        create_moevit("vit_tiny_patch16_224", {"a": 2}, checkpoint_path="/nonexistent.safetensors", **TINY_VIT)


def test_corrupt_checkpoint_is_refused_with_its_path(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.checkpoint: cannot load"):
        create_moevit("vit_tiny_patch16_224", {"a": 2}, checkpoint_path=str(path), **TINY_VIT)


def test_local_checkpoint_loads_offline(tmp_path):
    from safetensors.torch import save_file
    from tiny_models import tiny_vit
    dense = tiny_vit(seed=3)
    save_file(dense.state_dict(), str(tmp_path / "w.safetensors"))
    model = create_moevit("vit_tiny_patch16_224", {"a": 2}, checkpoint_path=str(tmp_path / "w.safetensors"),
                          **TINY_VIT)
    assert model.backbone.pos_embed.data_ptr() != dense.pos_embed.data_ptr()
    assert (model.backbone.pos_embed - dense.pos_embed).abs().max() == 0
    assert (model.blocks[1].attn.qkv.weight - dense.blocks[1].attn.qkv.weight).abs().max() == 0


def test_an_unsupported_attention_block_or_mlp_is_bad_input_in_one_line_not_a_traceback():
    """A ViT whose blocks carry another attention (timm's DiffAttention, say) reached the CLI as a ValueError
    traceback (exit 1): the refusal is bad input, one line and exit 2, like every other."""
    import copy

    from timm.layers import Attention, Mlp
    from tiny_models import tiny_vit

    from moebsr.errors import is_user_error
    from moebsr.model import UnsupportedModelError

    class OtherAttention(Attention):
        pass

    class OtherMlp(Mlp):
        def __init__(self, mlp: Mlp) -> None:
            super().__init__(8, 16)
            self.norm = torch.nn.LayerNorm(16)  # an inner norm: not an MLP the experts can copy

    vit = tiny_vit()
    other_attention = copy.deepcopy(vit)
    block = other_attention.blocks[1]
    swapped = OtherAttention(64, num_heads=2, qkv_bias=True)
    swapped.load_state_dict(block.attn.state_dict())
    block.attn = swapped
    other_mlp = copy.deepcopy(vit)
    other_mlp.blocks[2].mlp = OtherMlp(other_mlp.blocks[2].mlp)
    cases = [(other_attention, dict(token_drop=dict(blocks=[1], keep_rate=0.5)),
              r"^token_drop: blocks with OtherAttention attention are not supported; accepted: timm.layers.Attention"),
             (other_mlp, dict(moe=dict(blocks=[2], num_experts=2, top_k=1)),
              r"^moe: cannot upcycle a OtherMlp; accepted: timm.layers.Mlp"),
             (torch.nn.Linear(2, 2), {}, r"^model: Linear is not supported; accepted: timm VisionTransformer models "
                                         r"\(vit_\*, deit_\*, deit3_\*")]
    for model, kwargs, message in cases:
        with pytest.raises(UnsupportedModelError, match=message) as refused:
            create_moevit(model, {"a": 2}, **kwargs)
        assert is_user_error(refused.value) and "\n" not in str(refused.value)


def test_a_vision_transformer_from_another_timm_module_is_accepted_by_what_it_is():
    """vit_tiny_r_s16_p8_224 (timm's hybrid module: a ResNet stem, then ViT blocks) was refused by its module's name,
    although the same model worked when passed as an instance."""
    from moebsr.model.factory import check_model_name
    assert check_model_name("vit_tiny_r_s16_p8_224") == "vit_tiny_r_s16_p8_224"
    model = create_moevit("vit_tiny_r_s16_p8_224", {"a": 3}, img_size=64, moe=dict(blocks=[11], num_experts=2,
                          top_k=1), token_drop=dict(blocks=[6], keep_rate=0.5), bsr="paper").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64), "a")["a"].shape == (1, 3)
    with pytest.raises(ValueError, match=r"^model.name: 'resnet18' is not a ViT \(it is a timm 'resnet' model\)"):
        check_model_name("resnet18")
