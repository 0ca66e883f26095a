"""The timestep a flow student is told in training equals, bit for bit and in the same dtype, what the family's stock
diffusers pipeline tells its transformer at that step: in fp32, bf16 and fp16, at every one of the teacher's 1000
timesteps (so at every timestep of every shipped recipe), at the token counts of the shipped resolutions.

SD3's pipeline passes the scheduler's float32 t = 1000 sigma in every dtype; FLUX's and Qwen-Image's cast t to the
latents' dtype and divide by 1000 there. Telling the network float(sigma) * 1000 cast to the run dtype (the old rule) gives bf16 t = 752
where the pipeline says 750: a multi-step student trained at timesteps it is never run at.
"""

from __future__ import annotations

import pytest
import torch

from stepdistill.core.denoiser import Cond, Denoiser
from stepdistill.core.flow import FlowSchedule
from stepdistill.models.families.flux import FluxModel
from stepdistill.models.families.qwenimage import QwenImageModel
from stepdistill.models.families.sd3 import SD3Model
from stepdistill.models.tiny_flow import build_tiny_flux_pipeline, build_tiny_sd3_pipeline
from stepdistill.models.tiny_qwenimage import build_tiny_qwenimage_pipeline

torch.set_num_threads(1)

FAMILIES = {"sd3": (SD3Model, build_tiny_sd3_pipeline), "flux": (FluxModel, build_tiny_flux_pipeline),
            "qwenimage": (QwenImageModel, lambda seed: build_tiny_qwenimage_pipeline(seed))}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Tiny VAEs downsample by 2, the real ones by 8: tiny 32 / 128 / 256 px have the image-token counts of 128 / 512 /
# 1024 px (the shipped FLUX presets train at 1024; FLUX's shift depends on the count, SD3's does not). Qwen-Image's
# tiny VAE downsamples by 8 as the real one does; its shift also follows the count. (Wan's timestep is its UniPC
# scheduler's int64 in every dtype: tests/tiny/test_wan.py checks every step count dividing 1000.)
SIZES = {"sd3": [32], "flux": [32, 128, 256], "qwenimage": [32, 128]}
T = 1000


def family_of(name, pipe):
    cls, _ = FAMILIES[name]
    encoders = [getattr(pipe, e) for e, _, _, _ in cls.text_parts]
    tokenizers = [getattr(pipe, t) for _, t, _, _ in cls.text_parts]
    return cls(pipe.transformer, pipe.vae, encoders, tokenizers, dict(pipe.scheduler.config))


def pipeline_timesteps(pipe, name, size, dtype) -> torch.Tensor:
    """What the stock pipeline hands its transformer as `timestep`, one call per t = 999 .. 0 (sigmas (t + 1) / T)."""
    told = []

    def stub(hidden_states=None, timestep=None, **kwargs):  # records, and skips the network (1000 calls)
        told.append(timestep[:1].clone())
        return (torch.zeros_like(hidden_states),)

    pipe.transformer.forward = stub
    pipe.set_progress_bar_config(disable=True)
    sigmas = [(t + 1) / T for t in reversed(range(T))]
    extra = {"flux": {"guidance_scale": 3.5}, "sd3": {"guidance_scale": 1.0}}.get(name, {})
    pipe("a red cat", sigmas=sigmas, num_inference_steps=T, height=size, width=size, output_type="latent",
         generator=torch.Generator().manual_seed(0), **extra)
    return torch.cat(told).flip(0)  # ascending t


def training_timesteps(family, size, dtype) -> torch.Tensor:
    """What the training-time Denoiser (as train/build.py makes it) hands the network at t = 0 .. 999."""
    told = []

    def call(net, x_t, timestep, cond):
        told.append(timestep)
        return x_t

    schedule = family.noise_schedule(size)
    denoiser = Denoiser(family.unet, schedule, None, dtype=dtype, call=call, network_timestep=family.network_timestep)
    cond = Cond(torch.zeros(T, 4, 8), None)
    denoiser.raw(torch.zeros(T, 16, 2, 2), torch.arange(T), cond)
    return told[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_training_timestep_equals_the_pipelines_at_every_timestep(name, dtype):
    pipe = FAMILIES[name][1](seed=0).to(dtype)
    family = family_of(name, pipe)
    for size in SIZES[name]:
        theirs = pipeline_timesteps(pipe, name, size, dtype)
        ours = training_timesteps(family, size, dtype)
        assert ours.dtype == theirs.dtype, (size, ours.dtype, theirs.dtype)
        bad = (ours != theirs).nonzero().flatten()
        assert bad.numel() == 0, f"{name} {dtype} {size}px: t={bad[:5].tolist()} told {ours[bad[:5]].tolist()}, " \
                                 f"pipeline {theirs[bad[:5]].tolist()}"


def test_flux_bf16_timestep_is_the_pipelines_not_the_cast_sigma():
    """The issue's measured case: FLUX at 1024 px (mu 1.15), bf16: the transformer (x 1000 in bf16) sees the
    pipeline's bf16(1000 bf16(bf16(t) / 1000)), and the old cast of sigma differs at most multi-step timesteps."""
    pipe = build_tiny_flux_pipeline(seed=0)
    family = family_of("flux", pipe)
    schedule = family.noise_schedule(256)
    assert isinstance(schedule, FlowSchedule)
    t = torch.arange(T)
    ours = family.network_timestep(schedule, t, torch.bfloat16)
    seen = ours * 1000  # what FluxTransformer2DModel embeds (its own bf16 multiply)
    old = schedule.sigma(t).to(torch.bfloat16) * 1000
    assert (seen.float() - schedule.pipeline_timestep(t)).abs().max() <= 4  # bf16 spacing near 1000 is 4
    assert (old != seen).float().mean() > 0.2
