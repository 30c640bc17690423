import pytest
import torch
from tiny_models import images, tiny_moevit

from moebsr.model.lora import apply_lora


def test_lora_adapts_only_the_named_linear_layers_and_starts_as_the_identity():
    model = tiny_moevit(bsr="none", moe=dict(blocks=[3], num_experts=2, top_k=1)).eval()
    x = images()
    with torch.no_grad():
        before = model(x, "a")["a"]
    adapted = apply_lora(model, blocks=[1, 3], rank=2)
    assert adapted == ["backbone.blocks.1.attn.qkv", "backbone.blocks.1.attn.proj", "backbone.blocks.1.mlp.fc1",
                       "backbone.blocks.1.mlp.fc2", "backbone.blocks.3.attn.qkv", "backbone.blocks.3.attn.proj"]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in name or name.startswith("heads.") for name in trainable)
    assert {name for name in trainable if name.startswith("heads.")} == {"heads.a.weight", "heads.a.bias",
                                                                        "heads.b.weight", "heads.b.bias"}
    assert model.first_grad_block() == 1  # blocks before the first adapter still run without autograd
    with torch.no_grad():
        torch.testing.assert_close(model(x, "a")["a"], before)  # LoRA B starts at zero
    model.train()
    model(x, "a")["a"].square().sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


def test_bad_lora_modules_are_refused():
    with pytest.raises(ValueError, match=r"lora.modules: unknown module\(s\) \['mlp'\]"):
        apply_lora(tiny_moevit(bsr="none"), blocks=[1], modules=["mlp"])
