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
    MEASURED,
    attention_modules,
    attention_processor,
    resolve_backend,
    set_attention_backend,
)

# name: (B, H, Lq, Lk, D, dtype): every attention shape class of SD1.5 (head dims 40, 80, 160; cross attention over
# 77 text tokens), SDXL (64; 77 tokens) and FLUX (128, joint image + text self attention), at interpreter-sized
# lengths, in float32 and bfloat16. Lengths that are not multiples of the interpreter's tiles (fwd and dQ 32 x 16,
# dK/dV 16 x 32) run the masked tail tile; the *_even cases divide them and run the unmasked loops only.
SHAPE_CLASSES = {
    "sd15_self_d40": (1, 2, 37, 37, 40),
    "sd15_cross_d40_kv77": (1, 2, 24, 77, 40),
    "sd15_self_d80": (1, 1, 33, 33, 80),
    "sd15_self_d160": (1, 1, 20, 20, 160),
    "sdxl_self_d64_even": (2, 1, 64, 64, 64),
    "sdxl_cross_d64_kv77": (2, 1, 20, 77, 64),
    "flux_joint_d128": (1, 1, 40, 40, 128),
}
KERNEL_CASES = {f"{name}_{dtype}": (*shape, dtype) for name, shape in SHAPE_CLASSES.items()
                for dtype in ("float32", "bfloat16")}
KERNEL_CASES["sd15_self_d40_len40_float16"] = (1, 2, 40, 40, 40, "float16")
# float32: products in IEEE float32 (no TF32), so only summation order separates the kernel from the float64 math.
FP32_TOLERANCE = 1e-5


def half_tolerance(case: dict, name: str) -> float:
    """bfloat16 / float16: the kernel may be twice as far from float64 as PyTorch's own attention in that dtype (they
    round P at different points), plus one unit of the dtype's rounding."""
    return 2 * case[f"torch_{name}"] + case["eps"]


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


def torch_attention(q, k, v, scale):
    """softmax(q k^T scale) v with PyTorch ops in q's dtype (softmax in float32, as SDPA's math path does)."""
    s = (q @ k.transpose(-1, -2)) * scale
    return s.float().softmax(-1).to(q.dtype) @ v


def _errors(out, grads, ref, ref_grads) -> dict:
    errors = {"out": (out.double() - ref).abs().max().item()}
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads):
        errors[name] = (grad.double() - ref_grad).abs().max().item() / max(1.0, ref_grad.abs().max().item())
    return errors


def _kernel_case(B, H, Lq, Lk, D, dtype) -> dict:
    from stepdistill.core.triton_attention import flash_attention

    g = torch.Generator().manual_seed(Lq * 1000 + D)
    dtype = getattr(torch, dtype)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(dtype).requires_grad_() for n in (Lq, Lk, Lk))
    do = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    q_ref, k_ref, v_ref = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = math_attention(q_ref, k_ref, v_ref, D**-0.5)
    ref_grads = torch.autograd.grad(ref, (q_ref, k_ref, v_ref), do.double())

    out = flash_attention(q, k, v)
    errors = _errors(out, torch.autograd.grad(out, (q, k, v), do), ref, ref_grads)
    errors["out_dtype_ok"] = out.dtype == dtype and out.shape == (B, H, Lq, D)
    errors["eps"] = torch.finfo(dtype).eps
    if dtype != torch.float32:
        torch_out = torch_attention(q, k, v, D**-0.5)
        theirs = _errors(torch_out, torch.autograd.grad(torch_out, (q, k, v), do), ref, ref_grads)
        errors.update({f"torch_{name}": err for name, err in theirs.items()})
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
    """Forward and all three gradients against float64 math, at every SD1.5 / SDXL / FLUX shape class and dtype."""
    errors = interpreted[case]
    assert errors["out_dtype_ok"]
    for name in ("out", "dq", "dk", "dv"):
        tol = FP32_TOLERANCE if KERNEL_CASES[case][-1] == "float32" else half_tolerance(errors, name)
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


def test_auto_is_sdpa_on_cpu_and_measured_on_cuda_and_says_so(caplog):
    import importlib.util

    with caplog.at_level(logging.INFO, logger="stepdistill.core.attention"):
        assert resolve_backend("auto", "cpu") == "sdpa"
        on_cuda = resolve_backend("auto", torch.device("cuda"))
    assert "attention=auto picked sdpa on cpu" in caplog.text
    if importlib.util.find_spec("triton") is not None:
        assert on_cuda == MEASURED and "whichever measures faster" in caplog.text
    else:
        assert on_cuda == "sdpa" and "triton is not installed" in caplog.text
    assert set(BACKENDS) == {"auto", "sdpa", "xformers", "triton", "math"}


@pytest.fixture
def fake_timings(monkeypatch):
    """The measured processor on the CPU: kernel times come from a table, and `flash_attention` is SDPA with a call
    counter (the kernel itself is tested in the interpreter above)."""
    pytest.importorskip("triton")
    import stepdistill.core.triton_attention as ta

    timings, calls = {}, {"measured": [], "triton": 0}

    def kernel_ms(kernel, q, k, v, scale, grad):
        calls["measured"].append((kernel, q.shape[-2], grad))
        return timings[(q.shape[-2], grad)][kernel]

    def fake_flash(q, k, v, scale=None):
        calls["triton"] += 1
        return ta._sdpa(q, k, v, scale)

    monkeypatch.setattr(ta, "_kernel_ms", kernel_ms)
    monkeypatch.setattr(ta, "flash_attention", fake_flash)
    monkeypatch.setattr(ta, "_choices", {})
    return ta, timings, calls


def test_measured_attention_picks_the_faster_kernel_once_per_shape_and_logs_it(fake_timings, caplog):
    ta, timings, calls = fake_timings
    timings.update({(64, False): {"triton": 1.0, "sdpa": 2.0}, (16, False): {"triton": 3.0, "sdpa": 2.0},
                    (64, True): {"triton": 5.0, "sdpa": 4.0}})
    processor = attention_processor(MEASURED)
    g = torch.Generator().manual_seed(0)
    q64, q16 = torch.randn(1, 2, 64, 40, generator=g), torch.randn(1, 2, 16, 40, generator=g)
    kv = torch.randn(1, 2, 9, 40, generator=g)
    with caplog.at_level(logging.INFO, logger="stepdistill.core.triton_attention"):
        with torch.no_grad():
            out = processor.attend(q64, kv, kv, 40**-0.5)
            processor.attend(q64, kv, kv, 40**-0.5)  # cached: not measured again
            processor.attend(q16, kv, kv, 40**-0.5)
        q_grad = q64.clone().requires_grad_()
        processor.attend(q_grad, kv, kv, 40**-0.5).sum().backward()  # with gradients: its own measurement
    assert calls["measured"] == [("triton", 64, False), ("sdpa", 64, False), ("triton", 16, False),
                                 ("sdpa", 16, False), ("triton", 64, True), ("sdpa", 64, True)]
    assert calls["triton"] == 2  # the two no-grad calls at 64 tokens; 16 tokens and the training call ran sdpa
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q64, kv, kv))
    choices = set(ta.attention_choices().items())
    assert {((None, 1, 2, 64, 40, 9, torch.float32, False), "triton"), ((None, 1, 2, 16, 40, 9, torch.float32, False),
            "sdpa"), ((None, 1, 2, 64, 40, 9, torch.float32, True), "sdpa")} == choices
    assert "attention=auto: triton fwd at B, H, Lq, Lk, D = (1, 2, 64, 9, 40) float32 (triton 1.000 ms, sdpa 2.000" \
        in caplog.text
    assert "attention=auto: sdpa fwd+bwd" in caplog.text


def test_measured_attention_runs_sdpa_for_wide_heads_and_unmeasured_compiled_shapes(fake_timings, monkeypatch):
    ta, _, calls = fake_timings
    processor = attention_processor(MEASURED)
    wide = torch.randn(1, 1, 8, 512)
    with torch.no_grad():
        processor.attend(wide, wide, wide, 512**-0.5)  # a VAE's 512-wide head: beyond the kernel, nothing timed
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        q = torch.randn(1, 1, 8, 64)
        processor.attend(q, q, q, 0.125)  # inside torch.compile nothing can be timed: sdpa, and no cached choice
    assert calls == {"measured": [], "triton": 0}
    assert list(ta.attention_choices().values()) == ["sdpa"]


def test_kernel_pads_head_dims_only_when_needed_and_prunes_long_tiles():
    pytest.importorskip("triton")
    from stepdistill.core.triton_attention import TILES, _block_d, _configs, _prune

    assert {d: _block_d(d) for d in (40, 64, 80, 128, 160)} == {40: 64, 64: 64, 80: 128, 128: 128, 160: 256}
    for kernel in TILES:
        for d in (40, 64, 80, 160):
            assert len(_configs(kernel, _block_d(d))) >= 3, (kernel, d)
    configs = _configs("fwd", 64)
    kept = _prune(configs, {"Lq": 4096, "Lk": 77})
    assert kept and all(c.kwargs["BLOCK_N"] <= 128 for c in kept)
    assert {c.kwargs["BLOCK_N"] for c in _prune(configs, {"Lq": 4096, "Lk": 20})} <= {32}
    assert len(_prune(configs, {"Lq": 8, "Lk": 8})) == 1  # nothing fits: the smallest tile stays


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

    from stepdistill.core.attention import SDPAAttnProcessor

    torch.set_num_threads(1)
    unet = tiny_unet()
    x_t, t, encoder_hidden_states = unet_inputs()
    modules = attention_modules(unet)
    assert len(modules) == 14  # self + cross attention in 2 down, 4 up and 1 mid transformer blocks
    with torch.no_grad():
        assert set_attention_backend(unet, "math") == "math"
        assert all(type(m.processor) is AttnProcessor for m in modules)
        out_math = unet(x_t, t, encoder_hidden_states).sample
        assert set_attention_backend(unet, "auto") == "sdpa"
        assert set_attention_backend(unet, "sdpa") == "sdpa"
        assert all(type(m.processor) is SDPAAttnProcessor for m in modules)
        out_sdpa = unet(x_t, t, encoder_hidden_states).sample
        for m in modules:  # ours is diffusers' AttnProcessor2_0 less its no-op division
            m.set_processor(AttnProcessor2_0())
        out_theirs = unet(x_t, t, encoder_hidden_states).sample
    torch.testing.assert_close(out_sdpa, out_math, rtol=1e-4, atol=1e-5)
    assert torch.equal(out_sdpa, out_theirs)


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
