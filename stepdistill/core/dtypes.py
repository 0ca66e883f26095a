"""The one dtype map: the names configs and commands take (fp32, bf16, fp16) and diffusers' dtype keyword."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_from_name(name: str) -> torch.dtype:
    """`fp32` / `bf16` / `fp16` -> the torch dtype."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_kwargs(dtype: torch.dtype | None) -> dict:
    """from_pretrained's dtype keyword: `dtype` where diffusers has it (recent releases), else the older `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}
