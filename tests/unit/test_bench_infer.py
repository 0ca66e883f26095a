"""`stepdistill bench infer`: the full-size architectures are the released ones, and a tiny CPU run works end to end."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from stepdistill.bench.infer import SEGMENTS, add_bench_infer_command, bench_infer, format_table

from stepdistill.models.random_init import build_vae as _build_vae
from stepdistill.models.registry import family_names, get_family

FULL_CONFIGS = {family: get_family(family).full_configs for family in family_names()}


def _millions(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def test_full_size_configs_have_the_released_parameter_counts():
    """Counts of the public checkpoints (docs/research performance note, sec. 1), built on the meta device."""
    from diffusers import AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        sd15, sdxl = (UNet2DConditionModel(**FULL_CONFIGS[f]["unet"]) for f in ("sd15", "sdxl"))
        vae = _build_vae(FULL_CONFIGS["sdxl"]["vae"], "full", tiny=False)
        clip_l = CLIPTextModel(CLIPTextConfig(**FULL_CONFIGS["sd15"]["text_encoder"]))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**FULL_CONFIGS["sdxl"]["text_encoder_2"]))
        taesd = AutoencoderTiny()
    assert _millions(sd15) == pytest.approx(859.5, abs=0.1)
    assert _millions(sdxl) == pytest.approx(2567.5, abs=0.1)
    assert _millions(vae.decoder) + _millions(vae.post_quant_conv) == pytest.approx(49.5, abs=0.1)
    assert _millions(clip_l) == pytest.approx(123.1, abs=0.1)
    assert _millions(clip_g) == pytest.approx(694.7, abs=0.1)
    assert _millions(taesd.decoder) == pytest.approx(1.22, abs=0.01)
    heads = {m.to_q.out_features // m.heads for m in sdxl.modules() if type(m).__name__ == "Attention"}
    assert heads == {64}  # SDXL's head dim everywhere; SD1.5's are 40 / 80 / 160
    assert {m.to_q.out_features // m.heads for m in sd15.modules() if type(m).__name__ == "Attention"} == {40, 80, 160}


def test_cli_smoke_tiny_cpu_one_repeat(tmp_path):
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    add_bench_infer_command(parser.add_subparsers(dest="command"))
    out = tmp_path / "rows.json"
    args = parser.parse_args([
        "infer", "--family", "sd15", "--tiny", "--device", "cpu", "--resolution", "32", "--steps", "1", "2",
        "--backends", "auto", "sdpa", "--vae", "tiny", "--repeats", "1", "--warmup", "0", "--out", str(out),
    ])
    args.func(args)
    rows = json.loads(out.read_text())
    assert [(r["steps"], r["backend"], r["requested"]) for r in rows] == [
        (1, "sdpa", "auto"), (2, "sdpa", "auto"), (1, "sdpa", "sdpa"), (2, "sdpa", "sdpa")]
    for r in rows:
        assert r["device"].startswith("CPU") and r["vae"] == "tiny" and r["repeats"] == 1
        assert all(r[key] > 0 for key in SEGMENTS)
        # One repeat: the totals are exactly the three segments, with the text cold (encoded) or warm (a cache hit).
        assert r["total_ms"] == pytest.approx(r["text_ms"] + r["unet_ms"] + r["vae_ms"])
        assert r["total_warm_ms"] == pytest.approx(r["text_warm_ms"] + r["unet_ms"] + r["vae_ms"])
    assert "x the one-step UNet" in rows[1]["note"] and rows[1]["unet_ms_per_step"] == rows[1]["unet_ms"] / 2
    assert "sd15-tiny" in format_table(rows)


def test_flux_rows_run_euler_flow_steps_with_diffusers_attention():
    """The flow family's latency rows: random-init tiny FLUX (T5 word tokenizer), 16 latent channels in both VAEs."""
    torch.set_num_threads(1)
    rows = bench_infer("flux", steps=[1, 2], device="cpu", tiny=True, repeats=1, warmup=0, vae=["tiny", "full"],
                       resolution=32, show=False)
    assert [(r["vae"], r["steps"], r["backend"]) for r in rows] == [
        ("tiny", 1, "diffusers"), ("tiny", 2, "diffusers"), ("full", 1, "diffusers"), ("full", 2, "diffusers")]
    assert all(r[key] > 0 for r in rows for key in SEGMENTS)
    with pytest.raises(ValueError, match="keeps diffusers' own attention processors"):
        bench_infer("flux", tiny=True, device="cpu", backends=["triton"], show=False)


def test_fused_lora_changes_the_weights_and_leaves_plain_layers():
    from stepdistill.bench.infer import fuse_random_lora

    from stepdistill.models.random_init import build_family_model

    model = build_family_model("sd15", True, "tiny", "cpu", torch.float32)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    fuse_random_lora(model, rank=2)
    after = model.unet.state_dict()
    assert set(after) == set(before)  # unloaded: no lora_A / lora_B left for the compiled graph
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("to_q.weight"))


def test_unavailable_choices_are_refused():
    with pytest.raises(ValueError, match="family 'sd4' is not supported"):
        bench_infer(family="sd4", tiny=True, device="cpu", show=False)
    with pytest.raises(ValueError, match="unknown attention backend"):
        bench_infer(family="sd15", tiny=True, device="cpu", backends=["flash"], show=False)


@pytest.mark.slow
def test_tiny_cpu_benchmark_both_families_backends_vaes_and_compile():
    torch.set_num_threads(1)
    rows = []
    for family in ("sd15", "sdxl"):
        rows += bench_infer(family, steps=[1, 4], backends=["math", "sdpa"], compile=False, device="cpu", tiny=True,
                            repeats=3, vae=["full", "tiny"])
    rows += bench_infer("sd15", resolution=32, steps=1, backends="sdpa", compile=True, device="cpu", tiny=True,
                        repeats=2, vae="tiny")
    assert len(rows) == 2 * 2 * 2 * 2 + 1
    assert rows[-1]["compile"] is True
    for r in rows:
        assert all(r[key] > 0 for key in SEGMENTS)
    assert {(r["family"], r["steps"], r["backend"], r["vae"]) for r in rows if not r["compile"]} == {
        (f, n, b, v) for f in ("sd15", "sdxl") for n in (1, 4) for b in ("math", "sdpa") for v in ("full", "tiny")}
