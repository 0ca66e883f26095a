"""LoRA key layouts: which modules a canonical adapter state adapts, the export folder's file names, the kohya /
ComfyUI names. Pure key maths on tensors: model families name their layout with these, and export.py writes
the files; neither calls the other."""

from __future__ import annotations

import torch

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights(dir) looks for first
KOHYA_WEIGHT_NAME = "stepdistill_lora_kohya.safetensors"


def lora_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """The module paths a canonical state dict adapts, sorted."""
    return sorted({k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")})


def cast(v: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return v if dtype is None else v.to(dtype)


def kohya_module_name(module: str) -> str:
    """`down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in` (consistency.md 4.5)."""
    return "lora_unet_" + module.replace(".", "_")


def kohya_layout_tensors(state: dict[str, torch.Tensor], rank: int, alpha: float, dtype: torch.dtype | None = None,
                         name=kohya_module_name) -> dict[str, torch.Tensor]:
    """Kohya layout: `<name(module)>.lora_down.weight` (A), `.lora_up.weight` (B), `.alpha` per module; `name` is the
    UNet's `lora_unet_<module>` unless a family's ComfyUI loader reads other names (Qwen-Image, Wan)."""
    tensors = {}
    for module in lora_modules(state):
        key = name(module)
        tensors[f"{key}.lora_down.weight"] = cast(state[f"{module}.lora_A.weight"], dtype)
        tensors[f"{key}.lora_up.weight"] = cast(state[f"{module}.lora_B.weight"], dtype)
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype or torch.float32)
    return tensors
