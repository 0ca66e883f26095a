"""Stable Diffusion XL: two text encoders and the text_time added embedding, StableDiffusionXLPipeline."""

from diffusers import StableDiffusionXLPipeline

from stepdistill.export import dtype_kwargs

FAMILY = "sdxl"
PIPELINE_CLASS = StableDiffusionXLPipeline
# model_index.json `_class_name`s of base folders this family loads.
PIPELINE_CLASS_NAMES = ("StableDiffusionXLPipeline",)
# A UNet-only distillation LoRA leaves these empty; diffusers warns about each, harmlessly.
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def from_pretrained(base, dtype):
    """The base pipeline; its VAE upcasts itself in fp16 when the VAE config says force_upcast."""
    return StableDiffusionXLPipeline.from_pretrained(base, **dtype_kwargs(dtype))
