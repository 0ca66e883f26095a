"""Attention backends: the setting's rules, the processors on a tiny UNet, and our Triton kernel vs math attention.

The kernel checks run once, in a subprocess with TRITON_INTERPRET=1 (triton reads it when a kernel is
defined, and diffusers has imported triton before any test runs); that subprocess is this file run as a
script. The interpreter is slow, so the shapes are small but cross tile edges (tiles are 32 x 16 there).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from stepdistill.core.attention import (
    BACKENDS,
    attention_modules,
    attention_processor,
    resolve_backend,
    set_attention_backend,
)

# name: (B, H, Lq, Lk, D, dtype). Lengths are not multiples of the tiles; cross attention has Lk != Lq.
KERNEL_CASES = {
    "self_d40_len37": (1, 2, 37, 37, 40, "float32"),
    "self_d64_len50": (2, 1, 50, 50, 64, "float32"),
    "cross_d40_q45_kv77": (1, 2, 45, 77, 40, "float32"),
    "cross_d64_q20_kv9": (2, 1, 20, 9, 64, "float32"),
    "self_d80_len33": (1, 1, 33, 33, 80, "float32"),
    "self_d40_len40_fp16": (1, 2, 40, 40, 40, "float16"),
}
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}


def tiny_unet(seed: int = 0):
    """An SD-shaped UNet small enough for the interpreter: head dim 40 (padded to 64); 64 and 16 tokens at 8x8."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(40, 80), norm_num_groups=8, attention_head_dim=(1, 2), cross_attention_dim=24,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def tiny_vae(seed: int = 0):
    """A VAE whose mid-block attention takes the 4-D, group-norm, residual path of the processors."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4).eval()


def unet_inputs(batch: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 4, 8, 8, generator=g)
    encoder_hidden_states = torch.randn(batch, 7, 24, generator=g)
    return x_t, torch.full((batch,), 500), encoder_hidden_states


def math_attention(q, k, v, scale):
    """softmax(q k^T scale) v in float64: the reference."""
    return ((q.double() @ k.double().transpose(-1, -2)) * scale).softmax(-1) @ v.double()


def _kernel_case(B, H, Lq, Lk, D, dtype) -> dict:
    from stepdistill.core.triton_attention import flash_attention

    g = torch.Generator().manual_seed(Lq * 1000 + D)
    dtype = getattr(torch, dtype)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(dtype).requires_grad_() for n in (Lq, Lk, Lk))
    do = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    out = flash_attention(q, k, v)
    out.backward(do)
    grads = [x.grad.double() for x in (q, k, v)]
    q_ref, k_ref, v_ref = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = math_attention(q_ref, k_ref, v_ref, D**-0.5)
    ref.backward(do.double())
    errors = {"out": (out.double() - ref).abs().max().item()}
    for name, grad, x_ref in zip(("dq", "dk", "dv"), grads, (q_ref, k_ref, v_ref)):
        errors[name] = (grad - x_ref.grad).abs().max().item() / max(1.0, x_ref.grad.abs().max().item())
    errors["out_dtype_ok"] = out.dtype == dtype and out.shape == (B, H, Lq, D)
    return errors


def _unet_case() -> dict:
    unet = tiny_unet()
    x_t, t, encoder_hidden_states = unet_inputs()
    with torch.no_grad():
        set_attention_backend(unet, "math")
        out_math = unet(x_t, t, encoder_hidden_states).sample
        used = set_attention_backend(unet, "triton")
        out_triton = unet(x_t, t, encoder_hidden_states).sample
    vae, z = tiny_vae(), torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        set_attention_backend(vae, "math")
        image_math = vae.decode(z).sample
        set_attention_backend(vae, "triton")
        image_triton = vae.decode(z).sample
    return {"used": used, "err": (out_math - out_triton).abs().max().item(), "scale": out_math.abs().max().item(),
            "vae_err": (image_math - image_triton).abs().max().item(), "vae_scale": image_math.abs().max().item()}


def _compiled_case() -> dict:
    """The kernel is one opaque op to torch.compile: the whole graph compiles (fullgraph) and backpropagates."""
    from stepdistill.core.triton_attention import flash_attention

    g = torch.Generator().manual_seed(3)
    # q in diffusers' head-split layout (a transposed view), k and v contiguous, cross attention over 9 tokens.
    q = torch.randn(1, 20, 2, 40, generator=g).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(1, 2, 9, 40, generator=g).requires_grad_() for _ in range(2))
    compiled = torch.compile(lambda q, k, v: flash_attention(q, k, v).square().sum(), backend="aot_eager",
                             fullgraph=True)
    loss = compiled(q, k, v)
    dq = torch.autograd.grad(loss, q)[0]
    ref = math_attention(q, k, v, 40**-0.5).square().sum()
    dq_ref = torch.autograd.grad(ref, q)[0]
    return {"loss_err": abs(loss.item() - ref.item()) / ref.item(), "dq_err": (dq.double() - dq_ref).abs().max().item()}


def _run_interpreted() -> dict:
    torch.set_num_threads(1)
    results = {name: _kernel_case(*case) for name, case in KERNEL_CASES.items()}
    results["unet"] = _unet_case()
    results["compiled"] = _compiled_case()
    return results


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__], check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_triton_kernel_matches_math_attention(interpreted, case):
    errors = interpreted[case]
    tol = TOLERANCE[KERNEL_CASES[case][-1]]
    assert errors["out_dtype_ok"]
    for name in ("out", "dq", "dk", "dv"):
        assert errors[name] < tol, (case, name, errors)


def test_tiny_unet_and_vae_with_triton_processor_match_math(interpreted):
    result = interpreted["unet"]
    assert result["used"] == "triton"
    assert result["scale"] > 0.1
    assert result["err"] < 1e-4 * result["scale"], result
    assert result["vae_scale"] > 0.01 and result["vae_err"] < 1e-4 * result["vae_scale"], result


def test_triton_kernel_compiles_as_one_op(interpreted):
    result = interpreted["compiled"]
    assert result["loss_err"] < 1e-5 and result["dq_err"] < 1e-4, result


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="did you mean 'sdpa'.*use one of"):
        resolve_backend("spda", "cpu")
    with pytest.raises(ValueError, match="use one of"):
        set_attention_backend(tiny_unet(), "flash9")


def test_auto_picks_math_on_cpu_and_sdpa_on_cuda_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="stepdistill.core.attention"):
        assert resolve_backend("auto", "cpu") == "math"
        assert resolve_backend("auto", torch.device("cuda")) == "sdpa"
    assert "attention=auto picked math on cpu" in caplog.text
    assert "picked sdpa on cuda" in caplog.text
    assert set(BACKENDS) == {"auto", "sdpa", "xformers", "triton", "math"}


def test_unavailable_backends_are_refused_with_what_to_do(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="attention=triton needs a CUDA device.*use attention=sdpa"):
        resolve_backend("triton", "cpu")
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(ImportError, match=r"pip install stepdistill\[xformers\] or use attention=sdpa"):
            resolve_backend("xformers", "cuda")
    else:
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            resolve_backend("xformers", "cpu")
    with pytest.raises(ValueError, match="resolve_backend"):
        attention_processor("auto")


def test_triton_refuses_heads_wider_than_the_kernel(monkeypatch):
    pytest.importorskip("triton")
    from diffusers import AutoencoderKL

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets resolve_backend accept the CPU; nothing is launched
    vae = AutoencoderKL(block_out_channels=(8, 320), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4)
    with pytest.raises(ValueError, match="320-wide attention heads.*use attention=sdpa"):
        set_attention_backend(vae, "triton")


def test_set_attention_backend_installs_processor_everywhere_and_sdpa_equals_math():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    torch.set_num_threads(1)
    unet = tiny_unet()
    x_t, t, encoder_hidden_states = unet_inputs()
    modules = attention_modules(unet)
    assert len(modules) == 14  # self + cross attention in 2 down, 4 up and 1 mid transformer blocks
    with torch.no_grad():
        assert set_attention_backend(unet, "math") == "math"
        assert all(type(m.processor) is AttnProcessor for m in modules)
        out_math = unet(x_t, t, encoder_hidden_states).sample
        assert set_attention_backend(unet, "auto") == "math"
        assert set_attention_backend(unet, "sdpa") == "sdpa"
        assert all(type(m.processor) is AttnProcessor2_0 for m in modules)
        out_sdpa = unet(x_t, t, encoder_hidden_states).sample
    torch.testing.assert_close(out_sdpa, out_math, rtol=1e-4, atol=1e-5)


def test_set_attention_backend_on_vae_mid_block():
    vae = tiny_vae()
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        set_attention_backend(vae, "math")
        ref = vae.decode(z).sample
        set_attention_backend(vae, "sdpa")
        out = vae.decode(z).sample
    assert len(attention_modules(vae)) == 2  # encoder and decoder mid blocks
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    print(json.dumps(_run_interpreted()))
