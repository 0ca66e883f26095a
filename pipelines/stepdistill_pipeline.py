"""A diffusers custom pipeline for stepdistill LoRAs (SD1.5 and SDXL bases). Needs diffusers only: copy this file.

    pipe = DiffusionPipeline.from_pretrained(BASE, custom_pipeline="stepdistill_pipeline.py", trust_remote_code=True)
    pipe.load_stepdistill("runs/dmd_sd15/final")   # the LoRA, and the recipe in stepdistill.json
    image = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0)).images[0]

The recipe sets the scheduler (class and config overrides), the steps or timesteps, the guidance scale, eta and
the LoRA scale; call arguments override it. diffusers takes exactly one pipeline class from a custom-pipeline
file, so this one accepts the components of both families and runs the matching diffusers pipeline on them.
"""

import json
from pathlib import Path
from typing import ClassVar

import diffusers
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

RECIPE_FILE = "stepdistill.json"
RECIPE_FORMAT_VERSION = 1  # the newest stepdistill.json format this file reads


class StepDistillPipeline(DiffusionPipeline):
    """Text-to-image with a stepdistill few-step LoRA; dispatches to StableDiffusion(XL)Pipeline."""

    _optional_components: ClassVar[list[str]] = [
        "text_encoder_2", "tokenizer_2", "safety_checker", "feature_extractor", "image_encoder",
    ]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, text_encoder_2=None, tokenizer_2=None,
                 safety_checker=None, feature_extractor=None, image_encoder=None,
                 force_zeros_for_empty_prompt: bool = True):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, safety_checker=safety_checker,
            feature_extractor=feature_extractor, image_encoder=image_encoder,
        )
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self.recipe = None

    @property
    def family(self) -> str:
        return "sdxl" if self.text_encoder_2 is not None else "sd15"

    def family_pipeline(self):
        """The diffusers pipeline of this base's family, over the same (shared) modules."""
        parts = dict(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                     scheduler=self.scheduler, feature_extractor=self.feature_extractor,
                     image_encoder=self.image_encoder)
        if self.family == "sdxl":
            pipe = StableDiffusionXLPipeline(
                **parts, text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
                force_zeros_for_empty_prompt=self.config.force_zeros_for_empty_prompt,
            )
        else:
            pipe = StableDiffusionPipeline(**parts, safety_checker=self.safety_checker, requires_safety_checker=False)
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipe

    def load_stepdistill(self, lora_dir, lora_scale=None, adapter_name="stepdistill", fuse=False):
        """Load the LoRA in lora_dir and adopt its stepdistill.json recipe; returns self."""
        lora_dir = Path(lora_dir)
        recipe_path = lora_dir / RECIPE_FILE
        if not recipe_path.is_file():
            raise FileNotFoundError(f"no {RECIPE_FILE} in {lora_dir}: pass the folder a stepdistill run exported")
        recipe = json.loads(recipe_path.read_text())
        if recipe.get("format_version", 1) > RECIPE_FORMAT_VERSION:
            raise ValueError(f"{recipe_path} is newer than this pipeline file reads: get a newer stepdistill_pipeline.py")
        if recipe["family"] != self.family:
            raise ValueError(
                f"this LoRA was trained for {recipe['family']} ({recipe['base_model']}), but this base is "
                f"{self.family}: load the base it was trained on"
            )
        scheduler_class = getattr(diffusers, recipe["scheduler_class"], None)
        if scheduler_class is None:
            raise ValueError(f"diffusers has no {recipe['scheduler_class']}: upgrade diffusers")
        self.scheduler = scheduler_class.from_config(self.scheduler.config, **recipe["scheduler_config"])

        pipe = self.family_pipeline()
        pipe.load_lora_weights(str(lora_dir), adapter_name=adapter_name)
        pipe.set_adapters([adapter_name], adapter_weights=[recipe["lora_scale"] if lora_scale is None else lora_scale])
        if fuse:
            pipe.fuse_lora(adapter_names=[adapter_name])
            pipe.unload_lora_weights()
        self.recipe = recipe
        return self

    def recipe_kwargs(self) -> dict:
        """The call arguments the recipe fixes: steps or timesteps, guidance scale, eta."""
        if self.recipe is None:
            return {}
        kwargs = {"guidance_scale": self.recipe["guidance_scale"], "eta": self.recipe["eta"]}
        if self.recipe.get("timesteps"):
            kwargs["timesteps"] = list(self.recipe["timesteps"])
        else:
            kwargs["num_inference_steps"] = self.recipe["num_inference_steps"]
        for key, value in (self.recipe.get("size_conditioning") or {}).items():
            kwargs[key] = tuple(value)  # SDXL: the original / target size and crop the student was trained with
        return kwargs

    def __call__(self, prompt=None, **kwargs):
        defaults = self.recipe_kwargs()
        if "num_inference_steps" in kwargs or "timesteps" in kwargs:
            defaults.pop("num_inference_steps", None)
            defaults.pop("timesteps", None)
        return self.family_pipeline()(prompt, **{**defaults, **kwargs})
