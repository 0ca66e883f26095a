"""Named LoRA adapters on one tiny UNet: independent, strict, canonical keys, base untouched."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from stepdistill.core.denoiser import active_adapter
from stepdistill.core.lora import (
    LORA_TARGETS,
    adapter_config,
    adapter_parameters,
    adapter_state_dict,
    add_adapter,
    check_canonical_keys,
    copy_adapter,
    load_adapter_state_dict,
    resolve_targets,
)

torch.set_num_threads(1)


def tiny_unet():
    torch.manual_seed(0)
    # Two resolutions so the UNet has attention, conv_shortcut (32 -> 64 channels) and both resamplers.
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def forward(unet, name):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 3, 16)
    with torch.no_grad(), active_adapter(unet, name):
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample


def randomize(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture
def unet():
    return tiny_unet()


def test_resolve_targets():
    assert resolve_targets("full") == LORA_TARGETS["full"] and len(LORA_TARGETS["full"]) == 14
    assert resolve_targets(["to_q"]) == ["to_q"]
    with pytest.raises(ValueError, match="preset"):
        resolve_targets("ful")
    with pytest.raises(ValueError):
        resolve_targets([])


def test_full_preset_reaches_every_layer_kind(unet):
    params = add_adapter(unet, "student", rank=4)
    modules = {k.rsplit(".lora_", 1)[0] for k in params}
    for suffix in LORA_TARGETS["full"]:
        assert any(m.endswith(suffix) for m in modules), suffix


def test_new_adapter_is_identity_and_base_frozen(unet):
    base_out = forward(unet, None)
    base_before = {k: v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}
    for init in ("zeros", "gaussian"):
        add_adapter(unet, init, rank=4, alpha=2, init=init)
        torch.testing.assert_close(forward(unet, init), base_out, rtol=0, atol=0)
    trainable = {k for k, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in k or ".lora_B." in k for k in trainable)
    for k, v in unet.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base_before[k.replace(".base_layer", "")]), k


def test_adapters_independent_and_all_trainable(unet):
    base_out = forward(unet, None)
    a = add_adapter(unet, "a", rank=4)
    b = add_adapter(unet, "b", rank=2, alpha=1, targets="attn")
    # peft's add_adapter/set_adapter would have frozen "a"; both must stay trainable.
    assert all(p.requires_grad for p in a.values()) and all(p.requires_grad for p in b.values())
    assert set(a).isdisjoint(set()) and len(a) > len(b) > 0
    randomize(a, 0)
    randomize(b, 1)
    out_a, out_b = forward(unet, "a"), forward(unet, "b")
    assert (out_a - base_out).abs().max() > 1e-3
    assert (out_b - base_out).abs().max() > 1e-3
    assert (out_a - out_b).abs().max() > 1e-3
    # Switching back and forth is exact and leaves the teacher (base) exactly as it was.
    torch.testing.assert_close(forward(unet, None), base_out, rtol=0, atol=0)
    torch.testing.assert_close(forward(unet, "a"), out_a, rtol=0, atol=0)

    # Gradients of a loss under "a" reach "a" only.
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 16)
    with active_adapter(unet, "a"):
        unet(x, 10, encoder_hidden_states=ctx).sample.square().mean().backward()
    assert all(p.grad is not None for p in a.values())
    assert all(p.grad is None for p in b.values())


def test_state_dict_keys_canonical(unet):
    add_adapter(unet, "student", rank=4)
    add_adapter(unet, "fake_score", rank=4)
    state = adapter_state_dict(unet, "student")
    check_canonical_keys(state)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in state
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight" in state
    for k in state:
        assert "student" not in k and "fake_score" not in k and "base_model" not in k
    assert state.keys() == adapter_state_dict(unet, "fake_score").keys()
    assert adapter_config(unet, "student") == (4, 4, sorted(LORA_TARGETS["full"]))
    # A copy, not a view: training must not change a saved snapshot.
    randomize(adapter_parameters(unet, "student"), 0)
    assert all(not torch.equal(v, adapter_state_dict(unet, "student")[k]) for k, v in state.items() if "lora_B" in k)


def test_load_and_copy_roundtrip(unet):
    a = add_adapter(unet, "a", rank=4)
    add_adapter(unet, "target", rank=4)
    randomize(a, 0)
    copy_adapter(unet, "a", "target")
    torch.testing.assert_close(forward(unet, "target"), forward(unet, "a"), rtol=0, atol=0)
    assert all(p.requires_grad for p in a.values())

    saved = adapter_state_dict(unet, "a")
    randomize(a, 5)
    load_adapter_state_dict(unet, "a", saved)
    torch.testing.assert_close(forward(unet, "a"), forward(unet, "target"), rtol=0, atol=0)


def test_strict_load_errors(unet):
    add_adapter(unet, "a", rank=4)
    add_adapter(unet, "small", rank=2)
    add_adapter(unet, "attn", rank=4, targets="attn")
    state = adapter_state_dict(unet, "a")

    missing = dict(list(state.items())[1:])
    with pytest.raises(ValueError, match="1 missing"):
        load_adapter_state_dict(unet, "a", missing)
    with pytest.raises(ValueError, match="unexpected"):
        load_adapter_state_dict(unet, "attn", state)
    with pytest.raises(ValueError, match="base_model.model"):
        load_adapter_state_dict(unet, "a", {f"base_model.model.{k}": v for k, v in state.items()})
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state_dict(unet, "small", state)
    with pytest.raises(ValueError, match="rank or alpha"):
        copy_adapter(unet, "a", "small")
    with pytest.raises(KeyError, match="add_adapter"):
        load_adapter_state_dict(unet, "nope", state)
    with pytest.raises(ValueError, match="already has"):
        add_adapter(unet, "a", rank=4)


def test_check_canonical_keys_rejects_other_styles():
    with pytest.raises(ValueError, match="not canonical"):
        check_canonical_keys({"x.to_q.lora.down.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="both"):
        check_canonical_keys({"x.to_q.lora_A.weight": torch.zeros(1)})


# Real-size UNet configs (SD1.5: 859.5M parameters, SDXL: 2567M), built on the meta device: no memory, no weights.
SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


@pytest.mark.slow
@pytest.mark.parametrize("config, lcm_lora_millions", [(SD15_UNET, 67.5), (SDXL_UNET, 197.0)], ids=["sd15", "sdxl"])
def test_full_preset_matches_lcm_lora_size(config, lcm_lora_millions):
    """Rank 64 on the "full" preset has LCM-LoRA's trainable size (HF model cards: 67.5M SD1.5, 197M SDXL)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    n = sum(p.numel() for p in add_adapter(unet, "student", rank=64).values())
    assert abs(n / 1e6 - lcm_lora_millions) / lcm_lora_millions < 0.01
