"""Which timm backbones moebsr converts: every supported family trains one step, evaluates and equals its dense timm
model at initialisation; every unsupported one is refused in one line naming it and what is accepted.

``MODEL_FAMILIES`` is also the source of the compatibility table in ``docs/compatibility.md``
(``scripts/compat_tables.py`` writes it; ``tests/test_docs.py`` checks it is current), so the docs list exactly
what these tests run.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
import timm
import torch
from numerics import assert_close_at_scale

from moebsr.errors import is_user_error
from moebsr.model import create_moevit

TINY = dict(depth=2, embed_dim=64, num_heads=2)  # random weights, 2 blocks: seconds per family
ACCEPTED = r"accepted: .*ViT.*EVA"  # every refusal names the accepted families, EVA included


@dataclass(frozen=True)
class ModelFamily:
    """One row of the compatibility table.

    Attributes:
        family: The name users know it by.
        model: The timm model the tests build (random weights, shrunk by ``kwargs``).
        kwargs: ``timm.create_model`` arguments that make it tiny (and keep its structure).
        prefix_tokens: Class/distillation/register tokens the family carries.
        class_token: Whether it has a class token (without one, token dropping ranks by the attention received).
        refusal: ``None`` when supported, else a regex of the one-line refusal.
    """

    family: str
    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    prefix_tokens: Optional[int] = None
    class_token: bool = True
    refusal: Optional[str] = None

    @property
    def img_size(self) -> int:
        return self.kwargs.get("img_size", 32)


def _tiny(**kwargs: Any) -> dict[str, Any]:
    return {**TINY, "img_size": 32, "patch_size": 8, **kwargs}


MODEL_FAMILIES = [
    ModelFamily("ViT (augreg, original)", "vit_tiny_patch16_224", _tiny(), 1),
    ModelFamily("DeiT", "deit_tiny_patch16_224", _tiny(), 1),
    ModelFamily("DeiT distilled (distillation token)", "deit_tiny_distilled_patch16_224", _tiny(), 2),
    ModelFamily("DeiT-III (layer scale)", "deit3_small_patch16_224", _tiny(), 1),
    ModelFamily("DINOv2", "vit_small_patch14_dinov2", _tiny(img_size=28, patch_size=7), 1),
    ModelFamily("DINOv2 with registers", "vit_small_patch14_reg4_dinov2", _tiny(img_size=28, patch_size=7), 5),
    ModelFamily("CLIP image tower", "vit_base_patch16_clip_224", _tiny(), 1),
    ModelFamily("SigLIP (no class token, attention pooling)", "vit_base_patch16_siglip_224", _tiny(), 0, False),
    ModelFamily("FlexiViT", "flexivit_small", _tiny(), 1),
    ModelFamily("ViT without class token (global average pool)", "vit_base_patch16_gap_224", _tiny(), 0, False),
    ModelFamily("Hybrid ViT (ResNet stem)", "vit_tiny_r_s16_p8_224", dict(TINY, img_size=64), 1),
    ModelFamily("EVA-02 (rotary positions, packed SwiGLU)", "eva02_tiny_patch14_224", _tiny(img_size=28, patch_size=7),
                1),
    ModelFamily("EVA-02 base (separate q/k/v, SwiGLU with inner norm)", "eva02_base_patch14_224",
                _tiny(img_size=28, patch_size=7), 1),
    ModelFamily("DINOv3 (rotary positions, registers)", "vit_small_patch16_dinov3", _tiny(), 5),
    ModelFamily("Rotary ViT without class token (register, GAP)", "vit_medium_patch16_rope_reg1_gap_256", _tiny(), 1,
                False),
    ModelFamily("BEiT (relative position bias)", "beit_base_patch16_224",
                refusal=r"^model.name: 'beit_base_patch16_224' is not a ViT \(it is a timm 'beit' model\); "),
    ModelFamily("ViT with relative position (relpos)", "vit_relpos_base_patch16_224",
                refusal=r"^model.name: 'vit_relpos_base_patch16_224' is not a ViT \(it is a timm "
                        r"'vision_transformer_relpos' model\); "),
    ModelFamily("SAM image encoder", "samvit_base_patch16",
                refusal=r"^model.name: 'samvit_base_patch16' is not a ViT \(it is a timm 'vision_transformer_sam' "),
    ModelFamily("Parallel-block ViT", "vit_small_patch16_18x2_224", _tiny(),
                refusal=r"^model: blocks of type ParallelThingsBlock are not supported; "),
    ModelFamily("Swin", "swin_tiny_patch4_window7_224",
                refusal=r"^model.name: 'swin_tiny_patch4_window7_224' is not a ViT \(it is a timm 'swin_transformer' "),
    ModelFamily("ConvNeXt", "convnext_atto",
                refusal=r"^model.name: 'convnext_atto' is not a ViT \(it is a timm 'convnext' model\); "),
]
SUPPORTED = [row for row in MODEL_FAMILIES if row.refusal is None]
UNSUPPORTED = [row for row in MODEL_FAMILIES if row.refusal is not None]


def _dense(row: ModelFamily) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(row.model, pretrained=False, num_classes=0, **row.kwargs).eval()


def _images(row: ModelFamily, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, row.img_size, row.img_size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("row", SUPPORTED, ids=lambda row: row.model)
def test_a_supported_family_equals_its_dense_timm_model_at_initialisation(row):
    """Every MLP an MoE of copies (gates renormalised), no dropping: the MoE-ViT is the dense timm model."""
    dense = _dense(row)
    assert dense.num_prefix_tokens == row.prefix_tokens and (dense.cls_token is not None) == row.class_token
    moevit = create_moevit(copy.deepcopy(dense), {"a": 3, "b": 2}, bsr="all",
                           moe=dict(blocks=[0, 1], num_experts=4, top_k=2, renormalize=True)).eval()
    images = _images(row)
    with torch.no_grad():
        expected = dense.forward_head(dense.forward_features(images), pre_logits=True)
        features, task_rows = moevit.forward_features(images, ["a", "b"])
        pooled = moevit.backbone.forward_head(features, pre_logits=True)
    assert [task for task, _, _ in task_rows] == ["a", "b"]
    for _, start, end in task_rows:
        assert_close_at_scale(pooled[start:end], expected, 1e-5)


@pytest.mark.parametrize("row", SUPPORTED, ids=lambda row: row.model)
def test_a_supported_family_trains_one_step_with_moe_bsr_and_dropping_then_evaluates(row):
    torch.manual_seed(0)
    model = create_moevit(row.model, {"a": 3, "b": 2}, moe=dict(blocks=[1], num_experts=4, top_k=2),
                          token_drop=dict(blocks=[1], keep_rate=0.5), bsr=dict(preset="custom", trainable_blocks=[1]),
                          **row.kwargs)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert frozen and trainable and all(name.startswith(("backbone.blocks.1.", "backbone.norm", "backbone.fc_norm",
                                                         "backbone.attn_pool", "heads."))
                                        for name in trainable)
    images, labels = _images(row, 4), torch.tensor([0, 1, 2, 1])
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    model.train()
    logits = model(images, ["a", "b"])
    loss = torch.nn.functional.cross_entropy(logits["a"], labels) + \
        torch.nn.functional.cross_entropy(logits["b"], labels % 2) + 0.01 * model.aux_loss()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    optimizer.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[name], value) for name, value in frozen.items())
    assert not torch.equal(after["backbone.blocks.1.mlp.experts.fc1_weight"], trainable[
        "backbone.blocks.1.mlp.experts.fc1_weight"])
    patches, kept = model.backbone.patch_embed.num_patches, -(-model.backbone.patch_embed.num_patches // 2)
    model.eval()
    with torch.no_grad():
        outputs = model(images, ["a", "b"])
    assert outputs["a"].shape == (4, 3) and outputs["b"].shape == (4, 2)
    assert model.blocks[1].last_kept_index.shape == (4, kept) and patches > kept
    assert model.tokens_per_block()[1] == row.prefix_tokens + kept + 1  # the kept patches and the fused token


@pytest.mark.parametrize("row", UNSUPPORTED, ids=lambda row: row.model)
def test_an_unsupported_family_is_refused_in_one_line_naming_it_and_what_is_accepted(row):
    with pytest.raises(ValueError) as refused:
        create_moevit(row.model, {"a": 2}, **row.kwargs)
    message = str(refused.value)
    assert "\n" not in message and is_user_error(refused.value)
    assert re.match(row.refusal + ".*" + ACCEPTED, message), message
