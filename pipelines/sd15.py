"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, StableDiffusionPipeline."""

from diffusers import StableDiffusionPipeline

from stepdistill.export import dtype_kwargs

FAMILY = "sd15"
PIPELINE_CLASS = StableDiffusionPipeline
# model_index.json `_class_name`s of base folders this family loads.
PIPELINE_CLASS_NAMES = ("StableDiffusionPipeline",)
# A UNet-only distillation LoRA leaves these empty; diffusers warns about each, harmlessly.
TEXT_ENCODERS = ("text_encoder",)


def from_pretrained(base, dtype):
    """The base pipeline, with whatever safety checker the folder ships (eval code may drop it)."""
    return StableDiffusionPipeline.from_pretrained(base, **dtype_kwargs(dtype))
