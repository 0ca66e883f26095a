"""Denoisers: a diffusers UNet read as x0 and eps whatever it predicts, optionally under one LoRA adapter, and CFG."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from .compile import compiled_mode
from .lora import segments_of
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


def _inject_adapter_names(module, args, kwargs):
    kwargs["adapter_names"] = module._stepdistill_adapter_names
    return args, kwargs


@contextmanager
def mixed_adapters(unet, names: list[str | None]):
    """Run `unet` with adapter names[i] on sample i (None: the bare base) in one batched forward.

    PEFT's mixed-batch LoRA forward (the `adapter_names` argument of its LoRA layers): each layer runs its base once on
    the whole batch and adds each adapter's low-rank term to that adapter's rows only. A layer that some adapter does
    not have leaves that adapter's rows on the base, as `active_adapter` does.
    """
    names = ["__base__" if n is None else n for n in names]
    segments = segments_of(names)  # the fused path (core.lora.use_fused_lora) slices these rows: no index tensors
    layers = lora_layers(unet)
    saved = [m._disable_adapters for m in layers]
    handles = []
    try:
        object.__setattr__(unet, "_stepdistill_mixed_adapters", names)
        for m in layers:
            m._disable_adapters = False
            object.__setattr__(m, "_stepdistill_adapter_names", names)
            object.__setattr__(m, "_stepdistill_segments", segments)
            handles.append(m.register_forward_pre_hook(_inject_adapter_names, with_kwargs=True))
        yield unet
    finally:
        for h in handles:
            h.remove()
        for m, disabled in zip(layers, saved):
            m._disable_adapters = disabled
            m.__dict__.pop("_stepdistill_segments", None)
        object.__setattr__(unet, "_stepdistill_mixed_adapters", None)


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


def cast_timestep(schedule, t, dtype) -> torch.Tensor:
    """What a DDPM UNet pipeline tells the network at t: the integer t (a float schedule value in the network dtype).

    The default `network_timestep` of Denoiser; a model family whose pipeline computes its timestep in other
    arithmetic supplies its own (FamilyModel.network_timestep)."""
    timestep = schedule.network_timestep(t)
    return timestep.to(dtype) if timestep.is_floating_point() else timestep


def unet_call(unet, x_t, timestep, cond: Cond) -> torch.Tensor:
    """A diffusers UNet2DConditionModel's output at (x_t, timestep, cond): the default network call."""
    return unet(x_t, timestep, encoder_hidden_states=cond.encoder_hidden_states,
                added_cond_kwargs=cond.added_cond_kwargs, return_dict=False)[0]


class Denoiser:
    """D(x_t, t, cond) -> (x0, eps) for a denoising network under a named adapter (None = teacher, the frozen base).

    `call(net, x_t, timestep, cond)` runs the network on inputs already in its dtype and returns its output in x_t's
    layout: unet_call by default; a model family supplies its own (a transformer's pooled projections, packing,
    position ids, embedded guidance). `network_timestep(schedule, t, dtype)` is the timestep the network is told at t,
    computed exactly as the family's diffusers pipeline computes it in that dtype (cast_timestep by default: the
    integer t); a student trained at another value than its pipeline tells it is run at timesteps it never saw.
    """

    def __init__(self, unet, schedule: NoiseSchedule, adapter: str | None = None, dtype=None, call=None,
                 network_timestep=None):
        self.unet, self.schedule, self.adapter = unet, schedule, adapter
        self.dtype = dtype  # autocast / input dtype of the network; None = the network's own
        self.call = call or unet_call
        self.network_timestep = network_timestep or cast_timestep

    def network_inputs(self, x_t, t, cond: Cond):
        """(x_t, the timestep the network is told, cond) in the network's dtype."""
        dtype = self.dtype or next(self.unet.parameters()).dtype
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        timestep = self.network_timestep(self.schedule, t, dtype).to(x_t.device)
        return x_t.to(dtype), timestep, cond.to(x_t.device, dtype)

    def raw(self, x_t, t, cond: Cond) -> torch.Tensor:
        """The network's own output (eps, v, x0 or flow velocity by prediction_type)."""
        with active_adapter(self.unet, self.adapter):
            return self.call(self.unet, *self.network_inputs(x_t, t, cond))

    def __call__(self, x_t, t, cond: Cond) -> DenoiserOut:
        return self.read(self.raw(x_t, t, cond), x_t, t)

    def read(self, out, x_t, t) -> DenoiserOut:
        """(x0, eps) from the network's output `out` at (x_t, t)."""
        alpha, sigma = self.schedule.alpha_sigma(torch.as_tensor(t).to(x_t.device).reshape(-1).expand(x_t.shape[0]), x_t.ndim)
        x0, eps = x0_eps_from_output(out, x_t, alpha, sigma, self.schedule.prediction_type)
        return DenoiserOut(x0, eps)

    def plan(self, x_t, t, cond: Cond):
        """The UNet rows this call needs, [(denoiser, x_t, t, cond)], and how to read their outputs (denoise_together)."""
        return [(self, x_t, t, cond)], lambda outs: outs[0]


def cfg_combine(cond_out: torch.Tensor, uncond_out: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans eq. 6): uncond + w (cond - uncond); w = 1 is the conditional model."""
    return uncond_out + guidance_scale * (cond_out - uncond_out)


def uncond_for(uncond: Cond, cond: Cond, n: int) -> Cond:
    """The n unconditional rows that pair with `cond`'s: the empty prompt once per row, with `cond`'s size
    conditioning (SDXL time_ids) where it has one, as StableDiffusionXLPipeline does when no negative size is given.
    CFG then contrasts the prompt alone, also on real latents whose rows carry each image's own size (Batch.real_cond)."""
    uncond = uncond.index([0] * n) if len(uncond) != n else uncond
    ids = (cond.added_cond_kwargs or {}).get("time_ids")
    if ids is None or uncond.added_cond_kwargs is None or len(ids) != n:
        return uncond
    return Cond(uncond.encoder_hidden_states, {**uncond.added_cond_kwargs, "time_ids": ids.to(
        uncond.added_cond_kwargs["time_ids"].device, uncond.added_cond_kwargs["time_ids"].dtype)})


class GuidedDenoiser:
    """CFG on x0 and eps, conditional and unconditional halves run in one batched call.

    x0_w = x0_u + w (x0_c - x0_u), and eps_w likewise; since x0 and eps are affine in the network output
    at fixed t, this equals guiding the raw output (diffusers' convention) exactly. A family whose pipeline guides
    otherwise (Qwen-Image's norm-rescaled true CFG) supplies `rule(x_t, t, cond_out, uncond_out, w) -> DenoiserOut`
    (FamilyModel.guidance_rule); every teacher call of every method then guides as that pipeline does.
    """

    def __init__(self, denoiser: Denoiser, uncond: Cond, guidance_scale: float, rule=None):
        self.denoiser, self.uncond, self.guidance_scale, self.rule = denoiser, uncond, guidance_scale, rule

    def __call__(self, x_t, t, cond: Cond, guidance_scale: float | torch.Tensor | None = None) -> DenoiserOut:
        rows, combine = self.plan(x_t, t, cond, guidance_scale)
        return combine([d(*args) for d, *args in rows])

    def with_scale(self, guidance_scale: float | torch.Tensor) -> GuidedDenoiser:
        """The same denoiser at another default CFG scale (per-sample when a tensor)."""
        return GuidedDenoiser(self.denoiser, self.uncond, guidance_scale, self.rule)

    def plan(self, x_t, t, cond: Cond, guidance_scale=None):
        """[(denoiser, x_t, t, cond)] rows and their combination: one call of 2B rows, then CFG (denoise_together)."""
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        if isinstance(w, (int, float)) and w == 1.0:
            if hasattr(self.denoiser, "plan"):
                return self.denoiser.plan(x_t, t, cond)
            return [(self.denoiser, x_t, t, cond)], lambda outs: outs[0]
        n = x_t.shape[0]
        uncond = uncond_for(self.uncond, cond, n)
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(n)
        if torch.is_tensor(w):
            w = w.double().reshape(-1, *([1] * (x_t.ndim - 1)))

        def combine(outs):
            (both,) = outs
            c, u = DenoiserOut(both.x0[:n], both.eps[:n]), DenoiserOut(both.x0[n:], both.eps[n:])
            if self.rule is not None:
                return self.rule(x_t, t, c, u, w)
            return DenoiserOut(cfg_combine(c.x0, u.x0, w), cfg_combine(c.eps, u.eps, w))

        return [(self.denoiser, torch.cat([x_t, x_t]), torch.cat([t, t]), cond.cat(uncond))], combine


def _cat_conds(conds: list[Cond]) -> Cond:
    out = conds[0]
    for c in conds[1:]:
        out = out.cat(c)
    return out


def denoise_together(calls) -> list[DenoiserOut]:
    """[(denoiser, x_t, t, cond)] -> their outputs, the calls on one UNet run as ONE batched forward without grad.

    A denoiser is a Denoiser or GuidedDenoiser (or anything with their `plan`); rows of different adapters share the
    call through PEFT's per-sample adapters (mixed_adapters), e.g. DMD's teacher (CFG, 2B rows, base) and fake score
    (B rows, its adapter) on the same x_t. Equal to calling each in turn up to float rounding. Falls back to one call
    each where that cannot apply: grad on, a compiled UNet, whole or by region (its graphs guard on the adapter flags: a
    mixed call would add a graph per block shape and row split), a callable
    without a plan, or denoisers on different UNets or dtypes.
    """
    plans = [d.plan(*args) if hasattr(d, "plan") else None for d, *args in calls]
    rows = [r for p in plans if p is not None for r in p[0]]
    joint = (
        all(p is not None for p in plans) and len(rows) > 1 and not torch.is_grad_enabled()
        and all(isinstance(r[0], Denoiser) for r in rows)
        and len({(id(r[0].unet), r[0].dtype, r[0].call, r[0].network_timestep, id(r[0].schedule)) for r in rows}) == 1
        and compiled_mode(rows[0][0].unet) == "off"
    )
    if not joint:
        return [d(*args) for d, *args in calls]
    first = rows[0][0]
    device = rows[0][1].device
    dtype = first.dtype or next(first.unet.parameters()).dtype
    sizes = [x.shape[0] for _, x, _, _ in rows]
    x = torch.cat([x for _, x, _, _ in rows])
    t = torch.cat([torch.as_tensor(t, device=device).reshape(-1).expand(x_r.shape[0]) for _, x_r, t, _ in rows])
    cond = _cat_conds([c.to(device, dtype) for *_, c in rows])
    names = [n for (d, *_), size in zip(rows, sizes) for n in [d.adapter] * size]
    with mixed_adapters(first.unet, names):
        out = first.call(first.unet, *first.network_inputs(x, t, cond))  # the family's call (UNet or transformer)
    outs = iter(d.read(o, x_r, t_r) for (d, x_r, t_r, _), o in zip(rows, out.split(sizes)))
    return [combine([next(outs) for _ in plan_rows]) for plan_rows, combine in plans]
