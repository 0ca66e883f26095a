"""Named LoRA adapters on one frozen diffusers UNet, and their state dicts in one canonical key style.

Several adapters ("student", "fake_score", "target", DisBack nodes) live side by side on the same base
network; `stepdistill.core.denoiser.active_adapter` picks one per forward. Canonical keys are PEFT's, with
neither the adapter name nor a `base_model.model.` prefix:
`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight` (consistency.md sec. 4.5).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import torch

ATTN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

# LCM-LoRA's 14 patterns (also PCM's): attention, transformer in/out and feed-forward, resnets, resamplers.
LORA_TARGETS: dict[str, list[str]] = {
    "attn": ATTN_TARGETS,
    "full": ATTN_TARGETS + [
        "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut",
        "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
    ],
}

INITS = {"zeros": True, "gaussian": "gaussian"}  # both set B = 0, so a new adapter leaves the base unchanged

# A PEFT LoRA parameter: <module>.lora_A.<adapter>.weight (lora_B likewise).
_PEFT_PARAM = re.compile(r"^(?P<module>.+)\.(?P<ab>lora_A|lora_B)\.(?P<adapter>[^.]+)\.weight$")
_CANONICAL_KEY = re.compile(r"^(?P<module>.+)\.(?P<ab>lora_A|lora_B)\.weight$")


def resolve_targets(targets: str | Sequence[str]) -> list[str]:
    """A preset name ("attn", "full") or an explicit list of module-name suffixes -> the list of suffixes."""
    if isinstance(targets, str):
        if targets not in LORA_TARGETS:
            raise ValueError(
                f"unknown LoRA target preset {targets!r}: use one of {sorted(LORA_TARGETS)} "
                "or a list of module-name suffixes such as ['to_q', 'to_k']"
            )
        return list(LORA_TARGETS[targets])
    targets = list(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"LoRA targets must be a non-empty list of module-name suffixes, got {targets!r}")
    return targets


def adapter_names(unet) -> list[str]:
    """The adapters attached to `unet`, in the order they were added."""
    return list(getattr(unet, "peft_config", {}) or {})


def _require_adapter(unet, name: str) -> None:
    if name not in adapter_names(unet):
        raise KeyError(f"the UNet has no LoRA adapter {name!r} (it has {adapter_names(unet)}): add it with add_adapter")


def adapter_parameters(unet, name: str) -> dict[str, torch.nn.Parameter]:
    """Canonical key -> the live Parameter of adapter `name` (what an optimizer or an EMA holds)."""
    _require_adapter(unet, name)
    params = {}
    for param_name, p in unet.named_parameters():
        m = _PEFT_PARAM.match(param_name)
        if m and m["adapter"] == name:
            params[f"{m['module']}.{m['ab']}.weight"] = p
    return params


def add_adapter(
    unet,
    name: str,
    rank: int,
    alpha: float | None = None,
    targets: str | Sequence[str] = "full",
    init: str = "zeros",
) -> dict[str, torch.nn.Parameter]:
    """Attach a new trainable LoRA adapter `name` to `unet`, freeze the base, return its parameters by canonical key.

    alpha defaults to rank (scale alpha / rank = 1). Adapters added earlier keep their requires_grad and the
    UNet's active adapter is unchanged by the call (PEFT's add_adapter would freeze the others and switch).
    """
    from peft import LoraConfig

    if name in adapter_names(unet):
        raise ValueError(f"the UNet already has an adapter {name!r}: pick another name or reuse it")
    if init not in INITS:
        raise ValueError(f"unknown LoRA init {init!r}: use one of {sorted(INITS)}")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    config = LoraConfig(
        r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=resolve_targets(targets),
        init_lora_weights=INITS[init], lora_dropout=0.0,
    )

    previous = {k: p.requires_grad for k, p in unet.named_parameters() if _PEFT_PARAM.match(k)}
    layers_before = {id(m): m._active_adapter for m in unet.modules() if hasattr(m, "_active_adapter")}
    with warnings.catch_warnings():
        # Several adapters on one model is the design (DESIGN.md sec. 3), not an accident to warn about.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        unet.add_adapter(config, adapter_name=name)

    for k, p in unet.named_parameters():
        m = _PEFT_PARAM.match(k)
        p.requires_grad_(previous[k] if k in previous else bool(m and m["adapter"] == name))
    if layers_before:
        # Keep whatever was active before; layers created just now serve only the new adapter.
        for m in unet.modules():
            if hasattr(m, "_active_adapter"):
                m._active_adapter = layers_before.get(id(m), [])
    return adapter_parameters(unet, name)


def adapter_config(unet, name: str) -> tuple[int, float, list[str]]:
    """(rank, alpha, target-module suffixes) of adapter `name`, as needed by the exporters."""
    _require_adapter(unet, name)
    config = unet.peft_config[name]
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError(f"adapter {name!r} has per-module ranks or alphas, which stepdistill does not export")
    return config.r, config.lora_alpha, sorted(config.target_modules)


def adapter_state_dict(unet, name: str) -> dict[str, torch.Tensor]:
    """Detached copies of adapter `name`'s tensors under canonical keys (no adapter name, no PEFT prefix)."""
    return {k: p.detach().clone() for k, p in adapter_parameters(unet, name).items()}


# Prefixes other writers put before UNet module paths (PEFT wrapper, diffusers files, kohya files).
FOREIGN_PREFIXES = ("unet.base_model.model.", "base_model.model.", "unet.", "lora_unet_")


def _prefix_hint(keys) -> str:
    """Explain the usual reason a file's keys do not match: a prefix from another writer."""
    for prefix in FOREIGN_PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            return (
                f" The keys start with {prefix!r}: this is an exported file, not an adapter state dict; "
                "read it with stepdistill.export.load_diffusers_lora."
            )
    return ""


def check_canonical_keys(state: dict[str, torch.Tensor]) -> None:
    """Raise unless every key is `<module>.lora_A.weight` / `<module>.lora_B.weight` and each module has both."""
    bad = [k for k in state if not _CANONICAL_KEY.match(k) or k.startswith(FOREIGN_PREFIXES)]
    if bad:
        raise ValueError(
            f"{len(bad)} LoRA keys are not canonical '<module>.lora_A.weight' keys, e.g. {bad[:3]}." + _prefix_hint(bad)
        )
    modules_a = {k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")}
    modules_b = {k[: -len(".lora_B.weight")] for k in state if k.endswith(".lora_B.weight")}
    if modules_a != modules_b:
        raise ValueError(f"LoRA modules without both lora_A and lora_B: {sorted(modules_a ^ modules_b)[:5]}")


@torch.no_grad()
def load_adapter_state_dict(unet, name: str, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the existing adapter `name`; every key must match exactly, in name and shape.

    Strict on purpose: a node switch that silently loads nothing (DisBack's released code) trains against the
    wrong target without any error.
    """
    params = adapter_parameters(unet, name)
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"LoRA state does not match adapter {name!r}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). Was it saved from an adapter with the same "
            "targets on the same architecture?" + _prefix_hint(unexpected)
        )
    wrong = [(k, tuple(state[k].shape), tuple(p.shape)) for k, p in params.items() if state[k].shape != p.shape]
    if wrong:
        raise ValueError(
            f"LoRA state does not fit adapter {name!r}: {len(wrong)} shape mismatches, e.g. {wrong[:3]} "
            "(key, saved, expected); was it saved with another rank?"
        )
    for k, p in params.items():
        p.copy_(state[k].to(device=p.device, dtype=p.dtype))


def copy_adapter(unet, src: str, dst: str) -> None:
    """Overwrite adapter `dst` with `src`'s weights (same rank, alpha and targets), e.g. to start an EMA target."""
    if adapter_config(unet, src)[:2] != adapter_config(unet, dst)[:2]:
        raise ValueError(
            f"adapters {src!r} and {dst!r} differ in rank or alpha ({adapter_config(unet, src)[:2]} vs "
            f"{adapter_config(unet, dst)[:2]}): create {dst!r} with the same rank and alpha"
        )
    load_adapter_state_dict(unet, dst, adapter_state_dict(unet, src))
