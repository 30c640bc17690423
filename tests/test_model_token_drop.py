import math

import pytest
import torch
from numerics import assert_close_at_scale
from tiny_models import images, tiny_moevit, tiny_vit

from moebsr.model import attention_with_cls_scores, create_moevit, select_tokens
from moebsr.model.token_drop import TokenSelection


def _reference_cls_scores(attn, x):
    """CLS row of the full softmax attention matrix, averaged over heads (the unfused, materialised way)."""
    batch, tokens, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
    return weights[:, :, 0, 1:].mean(1)


def test_cls_scores_and_output_match_timm_on_fused_and_unfused_paths():
    attn = tiny_vit().blocks[1].attn.eval()
    x = torch.randn(3, 65, 64)
    for fused in (True, False):
        attn.fused_attn = fused
        out, scores = attention_with_cls_scores(attn, x)
        assert_close_at_scale(out, attn(x))
        assert_close_at_scale(scores, _reference_cls_scores(attn, x))


def test_kept_tokens_are_exactly_the_top_scored_and_fused_token_is_the_weighted_sum():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 4, generator=generator)
    scores = torch.rand(2, 10, generator=generator)
    out, kept_index = select_tokens(x, scores, keep_rate=0.35, fuse=True)
    keep = math.ceil(0.35 * 10)
    assert out.shape == (2, 1 + keep + 1, 4)
    for row in range(2):
        top = set(scores[row].argsort(descending=True)[:keep].tolist())
        assert set(kept_index[row].tolist()) == top
        assert min(scores[row, list(top)]) > max(scores[row, [j for j in range(10) if j not in top]])
        assert torch.equal(out[row, 0], x[row, 0])
        assert torch.equal(out[row, 1:1 + keep], x[row, 1 + kept_index[row]])  # original order kept
        dropped = [j for j in range(10) if j not in top]
        fused = sum(scores[row, j] * x[row, 1 + j] for j in dropped)
        torch.testing.assert_close(out[row, -1], fused)
    unfused, _ = select_tokens(x, scores, keep_rate=0.35, fuse=False)
    assert torch.equal(unfused, out[:, :-1])


def test_keep_rate_one_keeps_everything():
    x = torch.randn(2, 11, 4)
    out, kept = select_tokens(x, torch.rand(2, 10), keep_rate=1.0, fuse=True)
    assert out is x and kept is None


def test_block_drops_by_its_own_cls_attention():
    model = tiny_moevit(moe=dict(blocks=[3], num_experts=2, top_k=1), token_drop=dict(blocks=[1], keep_rate=0.25))
    block = model.blocks[1]
    x = torch.randn(2, 65, 64)
    scores = _reference_cls_scores(block.attn, block.norm1(x))
    out, _ = block.forward_attention(x, TokenSelection.start(2, 64, x.device))
    expected = scores.topk(16, dim=1).indices.sort(dim=1).values
    assert torch.equal(block.last_kept_index, expected)
    assert out.shape == (2, 1 + 16 + 1, 64)


def _reference_weights(attn, x):
    """The full softmax attention matrix [B, heads, N, N] (the unfused, materialised way)."""
    batch, tokens, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)


@pytest.mark.parametrize("registers", [0, 2])
def test_a_model_without_class_token_drops_by_the_attention_tokens_receive_not_by_its_first_token(registers):
    model = tiny_moevit(class_token=False, reg_tokens=registers, global_pool="avg",
                        moe=dict(blocks=[3], num_experts=2, top_k=1), token_drop=dict(blocks=[1], keep_rate=0.25))
    block = model.blocks[1]
    assert model.backbone.num_prefix_tokens == registers and not block.class_token
    x = torch.randn(2, 64 + registers, 64, generator=torch.Generator().manual_seed(0))
    weights = _reference_weights(block.attn, block.norm1(x))
    received = weights[..., registers:].mean(dim=(1, 2))  # over heads and every query
    if not registers:  # a distribution over the tokens, as CLS attention is (registers take the rest)
        assert_close_at_scale(received.sum(1), torch.ones(2))
    expected = received.topk(16, dim=1).indices.sort(dim=1).values
    by_first_token = weights[:, :, 0, registers:].mean(1).topk(16, dim=1).indices.sort(dim=1).values
    assert not torch.equal(expected, by_first_token)  # what was ranked before: a patch's or a register's attention
    for fused in (True, False):
        block.attn.fused_attn = fused
        out, _ = block.forward_attention(x, TokenSelection.start(2, 64, x.device))
        assert torch.equal(block.last_kept_index, expected), fused
        assert out.shape == (2, registers + 16 + 1, 64)
    with torch.no_grad():
        assert model(images(2), ["a", "b"])["b"].shape == (2, 3)


def test_a_model_without_class_token_or_moe_blocks_has_a_zero_balancing_loss():
    model = tiny_moevit(class_token=False, global_pool="avg", moe=dict(blocks=[], num_experts=2, top_k=1))
    model(images(2), "a")
    loss = model.aux_loss()
    assert loss.item() == 0.0 and loss.device == model.backbone.patch_embed.proj.weight.device


def test_deit_small_token_counts_follow_the_paper():
    torch.manual_seed(0)
    model = create_moevit("deit_small_patch16_224", {"a": 10}, token_drop=dict(keep_rate=0.5, fuse=True))
    counts = model.tokens_per_block()
    assert model.token_drop_blocks == (3, 6, 9)
    assert counts[2] == 197 and counts[3] == 100 and counts[6] == 52 and counts[9] == 28
    model.set_keep_rate(0.7)
    assert model.tokens_per_block()[3] == 1 + math.ceil(0.7 * 196) + 1


def test_dropping_applies_at_inference_and_training_and_token_count_is_measured():
    model = tiny_moevit(token_drop=dict(keep_rate=0.5))
    seen = []
    model.blocks[3].mlp.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    for train in (True, False):
        model.train(train)
        model(images(), "a")
    assert seen == [model.tokens_per_block()[3]] * 2
