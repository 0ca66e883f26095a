"""Denoisers: a diffusers UNet read as x0 and eps whatever it predicts, optionally under one LoRA adapter, and CFG."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from .param import x0_eps_from_output
from .schedule import NoiseSchedule


@dataclass
class Cond:
    """Conditioning for one batch: text embeddings and, for SDXL, added_cond_kwargs (text_embeds, time_ids)."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict | None = None

    def __len__(self):
        return self.encoder_hidden_states.shape[0]

    def cat(self, other: Cond) -> Cond:
        """Stack two conditionings along the batch (for one batched CFG call)."""
        added = None
        if self.added_cond_kwargs is not None:
            added = {k: torch.cat([v, other.added_cond_kwargs[k]]) for k, v in self.added_cond_kwargs.items()}
        return Cond(torch.cat([self.encoder_hidden_states, other.encoder_hidden_states]), added)

    def index(self, idx) -> Cond:
        added = None
        if self.added_cond_kwargs is not None:
            added = {k: v[idx] for k, v in self.added_cond_kwargs.items()}
        return Cond(self.encoder_hidden_states[idx], added)

    def to(self, device=None, dtype=None) -> Cond:
        added = None
        if self.added_cond_kwargs is not None:
            added = {k: v.to(device=device, dtype=dtype) for k, v in self.added_cond_kwargs.items()}
        return Cond(self.encoder_hidden_states.to(device=device, dtype=dtype), added)


@dataclass
class DenoiserOut:
    x0: torch.Tensor  # float64
    eps: torch.Tensor  # float64


def lora_layers(unet) -> list:
    """The PEFT LoRA layers of `unet`, cached per set of adapters: a full module scan costs ~20 ms on SDXL."""
    key = tuple(getattr(unet, "peft_config", {}) or ())
    cached = getattr(unet, "_stepdistill_lora_layers", None)
    if cached is None or cached[0] != key:
        layers = [m for m in unet.modules() if hasattr(m, "_active_adapter") and hasattr(m, "_disable_adapters")]
        object.__setattr__(unet, "_stepdistill_lora_layers", (key, layers))
        cached = (key, layers)
    return cached[1]


@contextmanager
def active_adapter(unet, name: str | None):
    """Run `unet` as base + adapter `name`, or as the bare base when name is None (the teacher).

    Switches PEFT layers' active adapter directly instead of peft's set_adapter(), which also flips
    requires_grad and so would change which parameters an optimizer sees in the middle of a step.
    """
    layers = lora_layers(unet)
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    try:
        for m in layers:
            if name is None:
                m._disable_adapters = True
            else:
                m._active_adapter = [name] if name in m.lora_A else []
                m._disable_adapters = False
        yield unet
    finally:
        for m, (active, disabled) in zip(layers, saved):
            m._active_adapter, m._disable_adapters = active, disabled


def checkpoint_under_adapter(module, *args):
    """Gradient checkpointing (diffusers' gradient_checkpointing_func) that recomputes under the forward's adapter.

    Backward recomputes a checkpointed block after `active_adapter` has already switched back, so plain
    torch checkpointing would rebuild the activations of another adapter and give silently wrong gradients
    to every adapter but the default one (e.g. the fake score).
    """
    layers = [m for m in module.modules() if hasattr(m, "_active_adapter") and hasattr(m, "_disable_adapters")]
    forward_state = [(m._active_adapter, m._disable_adapters) for m in layers]

    def run(*inputs):
        saved = [(m._active_adapter, m._disable_adapters) for m in layers]
        for m, (active, disabled) in zip(layers, forward_state):
            m._active_adapter, m._disable_adapters = active, disabled
        try:
            return module(*inputs)
        finally:
            for m, (active, disabled) in zip(layers, saved):
                m._active_adapter, m._disable_adapters = active, disabled

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def unet_call(unet, x_t, timestep, cond: Cond) -> torch.Tensor:
    """A diffusers UNet2DConditionModel's output at (x_t, timestep, cond): the default network call."""
    return unet(x_t, timestep, encoder_hidden_states=cond.encoder_hidden_states,
                added_cond_kwargs=cond.added_cond_kwargs, return_dict=False)[0]


class Denoiser:
    """D(x_t, t, cond) -> (x0, eps) for a denoising network under a named adapter (None = teacher, the frozen base).

    `call(net, x_t, timestep, cond)` runs the network on inputs already in its dtype and returns its output in x_t's
    layout: unet_call by default; a model family supplies its own (a transformer's pooled projections, packing,
    position ids, embedded guidance). `timestep` is what the schedule says the network is told
    (schedule.network_timestep: the integer t, or a flow teacher's scaled sigma).
    """

    def __init__(self, unet, schedule: NoiseSchedule, adapter: str | None = None, dtype=None, call=None):
        self.unet, self.schedule, self.adapter = unet, schedule, adapter
        self.dtype = dtype  # autocast / input dtype of the network; None = the network's own
        self.call = call or unet_call

    def raw(self, x_t, t, cond: Cond) -> torch.Tensor:
        """The network's own output (eps, v, x0 or flow velocity by prediction_type)."""
        dtype = self.dtype or next(self.unet.parameters()).dtype
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        timestep = self.schedule.network_timestep(t)
        if timestep.is_floating_point():
            timestep = timestep.to(x_t.device, dtype)
        cond = cond.to(x_t.device, dtype)
        with active_adapter(self.unet, self.adapter):
            out = self.call(self.unet, x_t.to(dtype), timestep, cond)
        return out

    def __call__(self, x_t, t, cond: Cond) -> DenoiserOut:
        alpha, sigma = self.schedule.alpha_sigma(torch.as_tensor(t).to(x_t.device).reshape(-1).expand(x_t.shape[0]), x_t.ndim)
        x0, eps = x0_eps_from_output(self.raw(x_t, t, cond), x_t, alpha, sigma, self.schedule.prediction_type)
        return DenoiserOut(x0, eps)


def cfg_combine(cond_out: torch.Tensor, uncond_out: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans eq. 6): uncond + w (cond - uncond); w = 1 is the conditional model."""
    return uncond_out + guidance_scale * (cond_out - uncond_out)


class GuidedDenoiser:
    """CFG on x0 and eps, conditional and unconditional halves run in one batched call.

    x0_w = x0_u + w (x0_c - x0_u), and eps_w likewise; since x0 and eps are affine in the network output
    at fixed t, this equals guiding the raw output (diffusers' convention) exactly.
    """

    def __init__(self, denoiser: Denoiser, uncond: Cond, guidance_scale: float):
        self.denoiser, self.uncond, self.guidance_scale = denoiser, uncond, guidance_scale

    def __call__(self, x_t, t, cond: Cond, guidance_scale: float | torch.Tensor | None = None) -> DenoiserOut:
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        if isinstance(w, (int, float)) and w == 1.0:
            return self.denoiser(x_t, t, cond)
        n = x_t.shape[0]
        uncond = self.uncond.index([0] * n) if len(self.uncond) != n else self.uncond
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(n)
        both = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), cond.cat(uncond))
        if torch.is_tensor(w):
            w = w.double().reshape(-1, *([1] * (x_t.ndim - 1)))
        x0 = cfg_combine(both.x0[:n], both.x0[n:], w)
        eps = cfg_combine(both.eps[:n], both.eps[n:], w)
        return DenoiserOut(x0, eps)
