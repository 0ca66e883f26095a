"""Session-wide tiny SD1.5 / SDXL teachers, built offline once, and a prompt file in their vocabulary."""

import pytest
import torch

from stepdistill.models.tiny import TINY_PROMPTS, save_tiny_pipeline

# The tiny models are too small to gain from threads, and the test machine is shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    """A diffusers StableDiffusionPipeline folder (UNet 32/64 channels, latents 4x8x8, images 16x16)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd15", family="sd15", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A diffusers StableDiffusionXLPipeline folder (two text encoders, text_time added embedding)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl", family="sdxl", seed=0)


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    """A text file, one prompt per line, every word in the tiny vocabulary."""
    path = tmp_path_factory.mktemp("data") / "prompts.txt"
    path.write_text("\n".join(TINY_PROMPTS) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A diffusers StableDiffusion3Pipeline folder (MMDiT, CLIP-L + CLIP-G + T5, 16-channel latents 8x8, images 16x16)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd3", family="sd3", seed=0)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A diffusers FluxPipeline folder (FLUX.1-dev layout: guidance embedding, packed latents, dynamic shift)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "flux", family="flux", seed=0)
