"""``moebsr profile``: what it measures follows the config, mixed precision included."""

import subprocess
import sys

import pytest
from run_helpers import QUICKSTART, REPO, subprocess_env

from moebsr.analysis.profiling import format_profile, profile_config
from moebsr.config import load_config

# 64 patch tokens: activations, not the bf16 weight copies autocast saves for backward, make up most saved bytes
TINY = ["model.checkpoint=null", "model.img_size=32", "model.patch_size=4", "model.depth=4", "model.embed_dim=64",
        "model.num_heads=2", "moe.num_experts=4", "train.batch_size=8"]


def _profile(*overrides: str) -> dict:
    return profile_config(load_config(QUICKSTART, [*TINY, *overrides]), steps=1, warmup=1)


def test_profile_measures_under_the_configured_autocast():
    fp32, bf16 = _profile(), _profile("train.mixed_precision=bf16")
    assert (fp32["precision"], bf16["precision"]) == ("no", "bf16")
    # matmul inputs are saved in bf16 under autocast (norms and the residual stream stay fp32): 0.72x measured
    assert bf16["saved_activation_bytes_per_image"] < 0.8 * fp32["saved_activation_bytes_per_image"]
    assert bf16["train_flops_per_image"] == pytest.approx(fp32["train_flops_per_image"], rel=0.02)
    assert "precision bf16 autocast" in format_profile(bf16) and "precision fp32" in format_profile(fp32)
    recipe = format_profile(bf16).split("\n\n")[0]  # the same recipe block training prints at start
    assert "  token dropping    blocks [0, 1, 2] · keep 0.5, fused · decision `shared`" in recipe
    assert "precision bf16" in recipe and "  tokens per block  34 19 11 11" in recipe


def test_profile_measures_the_step_with_the_frozen_trunk_read_back():
    import torch
    from tiny_models import images, tiny_moevit
    from torch.utils.flop_counter import FlopCounterMode

    from moebsr.analysis.profiling import cached_trunk_step, synthetic_labels, training_step_flops, unfused_attention

    report = _profile("bsr.preset=last_k", "bsr.last_k=2", "moe.blocks=[3]")
    assert report["cached_from_block"] == 2 and "blocks 0-1 read back" in format_profile(report)
    assert 0 < report["cached_train_flops_per_image"] < report["train_flops_per_image"]
    assert report["cached_step_cpu_time_s"] > 0
    # the saving is exactly the frozen blocks' forward: no backward ran through them anyway
    model = tiny_moevit(moe=dict(blocks=[3], num_experts=4, top_k=2), bsr=dict(preset="last_k", last_k=2)).train()
    x, labels = images(4), synthetic_labels({"a": 10}, 4)
    with unfused_attention(model), FlopCounterMode(display=False) as prefix, torch.no_grad():  # as the profile counts
        model.forward_frozen_trunk(x, ["a"])
    cached = cached_trunk_step(model, x, labels, lambda trunk: None, x.device, steps=1, warmup=1, precision="no")
    whole = training_step_flops(model, x, labels)
    assert cached["cached_train_flops_per_image"] * 4 == whole - prefix.get_total_flops()
    assert _profile()["train_flops_per_image"] > 0 and "cached_from_block" not in _profile()  # block 0 trains


def test_python_dash_m_moebsr_is_the_moebsr_command():
    result = subprocess.run([sys.executable, "-m", "moebsr", "tasks", "digits*"], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "digits_parity" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "moebsr", "profile", "--config", str(QUICKSTART),
                          "model.name=resnet50"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: model.name: 'resnet50' is not a ViT (it is a timm 'resnet' model); accepted: a timm ViT/DeiT (models "
        "that build a timm VisionTransformer, e.g. vit_tiny_patch16_224, deit_small_patch16_224; see "
        "timm.list_models(module='vision_transformer')) or EVA/EVA-02 (models that build a timm Eva, e.g. "
        "eva02_tiny_patch14_224; module='eva'); not BEiT, SAM, parallel-block ViTs, Swin or CNNs"]
