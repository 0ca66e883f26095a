"""Our Triton attention on CUDA at SD1.5 / SDXL shapes: forward and gradients vs SDPA, a UNet with each
processor, and a printed timing against SDPA (printed, never asserted; run with `pytest -m gpu -s`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from stepdistill.bench.gpu import ATTENTION_SHAPES as SHAPES  # the shapes `bench gpu` times

from stepdistill.core.attention import set_attention_backend
from stepdistill.core.triton_attention import flash_attention

DTYPES = {"float16": (torch.float16, 2e-3, 2e-2), "bfloat16": (torch.bfloat16, 1.6e-2, 6e-2)}


def _qkv(B, H, Lq, Lk, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, H, n, D, device="cuda", dtype=dtype, generator=g).requires_grad_() for n in (Lq, Lk, Lk)]


def _reference(q, k, v):
    """Attention and its gradients in float32 math: the ground truth both kernels are measured against."""
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q32, k32, v32)
    return out, (q32, k32, v32)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward_and_gradients_match_reference(shape, dtype_name):
    dtype, atol_out, rtol_grad = DTYPES[dtype_name]
    q, k, v = _qkv(*SHAPES[shape], dtype)
    do = torch.randn_like(q)
    out = flash_attention(q, k, v)
    out.backward(do)
    ref, leaves = _reference(q, k, v)
    ref.backward(do.float())
    # Judge ours against SDPA's own error to the float32 reference: within 2x of it, or an absolute floor.
    sdpa_q, sdpa_k, sdpa_v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    sdpa_out = F.scaled_dot_product_attention(sdpa_q, sdpa_k, sdpa_v)
    sdpa_out.backward(do)
    err = (out.float() - ref).abs().max().item()
    sdpa_err = (sdpa_out.float() - ref).abs().max().item()
    assert err <= max(2 * sdpa_err, atol_out), (shape, err, sdpa_err)
    for ours, theirs, leaf in zip((q.grad, k.grad, v.grad), (sdpa_q.grad, sdpa_k.grad, sdpa_v.grad), leaves):
        scale = leaf.grad.abs().max().item()
        err = (ours.float() - leaf.grad).abs().max().item()
        sdpa_err = (theirs.float() - leaf.grad).abs().max().item()
        assert err <= max(2 * sdpa_err, rtol_grad * scale), (shape, err, sdpa_err, scale)


def _time_ms(fn, repeats=20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def _timings(attend, q, k, v, do) -> tuple[float, float]:
    """Milliseconds of a forward, and of a forward plus backward."""
    with torch.no_grad():
        fwd = _time_ms(lambda: attend(q, k, v))
    return fwd, _time_ms(lambda: torch.autograd.grad(attend(q, k, v), (q, k, v), do))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_print_timing_vs_sdpa(shape):
    q, k, v = _qkv(*SHAPES[shape], torch.float16)
    do = torch.randn_like(q)
    rows = {name: _timings(attend, q, k, v, do)
            for name, attend in (("triton", flash_attention), ("sdpa", F.scaled_dot_product_attention))}
    ratio_fwd, ratio_all = (rows["triton"][i] / rows["sdpa"][i] for i in (0, 1))
    print(f"\n{shape} on {torch.cuda.get_device_name()}: triton fwd {rows['triton'][0]:.3f} ms, fwd+bwd "
          f"{rows['triton'][1]:.3f} ms; sdpa fwd {rows['sdpa'][0]:.3f} ms, fwd+bwd {rows['sdpa'][1]:.3f} ms; "
          f"ratio fwd {ratio_fwd:.2f}x, fwd+bwd {ratio_all:.2f}x (goal <= 1.3x)")
    assert ratio_fwd > 0 and ratio_all > 0


def test_sd15_shaped_unet_triton_matches_sdpa_and_trains():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    # SD1.5's channel and head layout (head dims 40 / 80 / 160) at reduced depth, so the test stays quick.
    unet = UNet2DConditionModel(
        sample_size=32, block_out_channels=(320, 640, 1280), layers_per_block=1, attention_head_dim=8,
        cross_attention_dim=768, down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2,
    ).to("cuda", torch.float16)
    x_t = torch.randn(2, 4, 32, 32, device="cuda", dtype=torch.float16)
    t = torch.tensor([999, 500], device="cuda")
    encoder_hidden_states = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
    outs, grads = {}, {}
    for backend in ("sdpa", "triton"):
        set_attention_backend(unet, backend)
        unet.zero_grad()
        out = unet(x_t, t, encoder_hidden_states).sample
        out.float().square().mean().backward()
        outs[backend] = out.detach().float()
        grads[backend] = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.grad.float()
    scale = outs["sdpa"].abs().max().item()
    assert (outs["triton"] - outs["sdpa"]).abs().max().item() < 2e-2 * scale
    gscale = grads["sdpa"].abs().max().item()
    assert gscale > 0 and (grads["triton"] - grads["sdpa"]).abs().max().item() < 5e-2 * gscale


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_print_full_size_inference_latency(family):
    """`stepdistill bench infer` at full size, eager: one and four steps, SDPA vs our kernel, full and tiny VAE."""
    from stepdistill.bench.infer import bench_infer

    rows = bench_infer(family, steps=[1, 4], backends=["sdpa", "triton"], compile=False, device="cuda", repeats=5,
                       vae=["full", "tiny"])
    assert len(rows) == 8 and all(r["device"] == torch.cuda.get_device_name() for r in rows)
    assert {r["backend"] for r in rows} == {"sdpa", "triton"}
