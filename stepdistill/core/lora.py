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


# ---------------------------------------------------------------------------------------------------------------
# The fused LoRA execution path (issue 33): y = base(x) + scale * (x A^T) B^T as ONE autograd node per layer
# ---------------------------------------------------------------------------------------------------------------
#
# Beside PEFT, not inside it: PEFT's layers stay the parameter containers (so state dicts, exports, merging and
# `adapter_parameters` keep PEFT's keys byte for byte), and only their forward is replaced, per instance, by
# `use_fused_lora`. PEFT's custom-layer hook (LoraConfig._register_custom_module) swaps the whole layer class by base
# layer type, which would mean re-implementing merge/unmerge/state handling for Linear and Conv2d as well.
#
# What the fused forward saves against PEFT's (per layer, forward + backward): the input cast to the fp32 adapter
# dtype and autocast's cast back, the two weight casts per call (the compute copies of A and B are made once per
# optimizer step: `_compute_weights` keys them on the masters' version counters), the scaling multiply, the add
# and their backward nodes; the per-sample (mixed-adapter) call slices contiguous rows instead of indexing with
# Python lists (a host-to-device copy and a sync per list on a GPU).


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + bias + scale (x a^T) b^T; gradients for x and the fp32 masters A, B (a, b: their compute copies)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, a, b, scale, weight_t, a_t, b_t):
        # weight_t, a_t, b_t: transposed views made once (_compute_weights, _base_weights), not a `t` per call
        x2 = _rows(x)
        h = torch.mm(x2, a_t)  # [n, r]
        y = torch.mm(x2, weight_t) if bias is None else torch.addmm(bias, x2, weight_t)
        y.addmm_(h, b_t, alpha=scale)
        ctx.save_for_backward(x2, weight, a, b, h)
        ctx.scale, ctx.x_shape, ctx.dtypes = scale, x.shape, (lora_a.dtype, lora_b.dtype)
        return _unrows(y, x.shape)

    @staticmethod
    def backward(ctx, g):
        x2, weight, a, b, h = ctx.saved_tensors
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        g2 = _rows(g)
        grad_x = grad_a = grad_b = None
        if need_x or need_a:
            gh = torch.mm(g2, b)  # [n, r]: d loss / d h
            if ctx.scale != 1.0:
                gh = gh * ctx.scale
            if need_x:
                grad_x = _unrows(torch.mm(g2, weight).addmm_(gh, a), ctx.x_shape)
            if need_a:
                grad_a = (gh.t() @ x2).to(ctx.dtypes[0])
        if need_b:
            grad_b = g2.t() @ h
            if ctx.scale != 1.0:
                grad_b = grad_b * ctx.scale
            grad_b = grad_b.to(ctx.dtypes[1])
        return grad_x, None, None, grad_a, grad_b, None, None, None, None, None, None


_CONV_BACKWARD = torch.ops.aten.convolution_backward


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., features] -> [n, features] (no op for a matrix)."""
    return x if x.ndim == 2 else x.reshape(-1, x.shape[-1])


def _unrows(y: torch.Tensor, shape) -> torch.Tensor:
    return y if len(shape) == 2 else y.view(*shape[:-1], y.shape[-1])


def _base_linear(base, x: torch.Tensor) -> torch.Tensor:
    """The frozen nn.Linear alone, as F.linear computes it under autocast, with its transposed weight made once."""
    weight, bias, weight_t = _base_weights(base, _compute_dtype(x, base.weight))
    x2 = _rows(x.to(weight.dtype))
    return _unrows(torch.mm(x2, weight_t) if bias is None else torch.addmm(bias, x2, weight_t), x.shape)


class _LoraConv2d(torch.autograd.Function):
    """y = conv(x, W, bias) + scale conv1x1(conv(x, a), b), PEFT's conv LoRA (A with the base's kernel, stride and
    padding, B 1x1); gradients for x and the fp32 masters A, B."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, a, b, scale, stride, padding):
        conv = torch.nn.functional.conv2d
        h = conv(x, a, None, stride, padding)
        y = conv(x, weight, bias, stride, padding).add_(conv(h, b), alpha=scale)
        ctx.save_for_backward(x, weight, a, b, h)
        ctx.scale, ctx.stride, ctx.padding, ctx.dtypes = scale, stride, padding, (lora_a.dtype, lora_b.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, a, b, h = ctx.saved_tensors
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        one, zero = [1, 1], [0, 0]
        grad_x = grad_a = grad_b = None
        if need_x or need_a or need_b:
            gh, grad_b, _ = _CONV_BACKWARD(g, h, b, None, one, zero, one, False, zero, 1,
                                           [need_x or need_a, need_b, False])
            if ctx.scale != 1.0:
                gh = gh * ctx.scale if gh is not None else None
                grad_b = grad_b * ctx.scale if grad_b is not None else None
            if gh is not None:
                lora_x, grad_a, _ = _CONV_BACKWARD(gh, x, a, None, list(ctx.stride), list(ctx.padding), one, False,
                                                   zero, 1, [need_x, need_a, False])
                if need_x:
                    grad_x = _CONV_BACKWARD(g, x, weight, None, list(ctx.stride), list(ctx.padding), one, False,
                                            zero, 1, [True, False, False])[0].add_(lora_x)
        grad_a = grad_a.to(ctx.dtypes[0]) if need_a else None
        grad_b = grad_b.to(ctx.dtypes[1]) if need_b else None
        return grad_x, None, None, grad_a, grad_b, None, None, None, None, None


def _compute_weights(layer, adapter: str, dtype) -> tuple[torch.Tensor, ...]:
    """Adapter `adapter`'s (a, b, a^T, b^T) as the fused path multiplies them: views of the fp32 masters when
    `dtype` is theirs, else copies in `dtype` refreshed once per change of the masters (an optimizer step, a load, an
    EMA update: each bumps the tensor's version counter), not once per call; every stale layer of the network in one
    foreach copy (_ComputeCopies)."""
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if torch.compiler.is_compiling():  # traced into the graph, where the cast fuses with its neighbours
        a, b = A.detach().to(dtype), B.detach().to(dtype)
        return a, b, _t(a), _t(b)
    if A.dtype == dtype and B.dtype == dtype:
        # Views of a master follow its in-place updates: only a new storage makes them stale.
        key = (A.data_ptr(), B.data_ptr())
        cache = layer.__dict__.setdefault("_stepdistill_compute", {})
        hit = cache.get((adapter, dtype))
        if hit is None or hit[0] != key:
            a, b = A.detach(), B.detach()
            hit = (key, (a, b, _t(a), _t(b)))
            cache[(adapter, dtype)] = hit
        return hit[1]
    copies = layer.__dict__.get("_stepdistill_copies")
    if copies is None:  # a layer outside use_fused_lora's network: a group of its own
        copies = layer.__dict__["_stepdistill_copies"] = _ComputeCopies([layer])
    return copies.get(layer, adapter, dtype)


def _version_key(A: torch.Tensor, B: torch.Tensor) -> tuple:
    return A._version, B._version, A.data_ptr(), B.data_ptr()


class _ComputeCopies:
    """The low-precision compute copies of every adapter's A and B on one network, in buffers made once.

    When a layer finds its copy stale (the masters' version counters moved), every stale layer of that adapter is
    refreshed at once with ONE `_foreach_copy_` (fp32 -> bf16 in a multi-tensor kernel on a GPU) instead of a cast,
    a detach and two transposes per tensor: the transposes are views of the buffers, made once. Buffers are written in
    place, so a graph that saved them and is back-propagated after a refresh fails loudly (version check), never
    silently; the loop never does that (every backward precedes its optimizer step).
    """

    def __init__(self, layers):
        self.layers = list(layers)
        self.entries: dict = {}  # (id(layer), adapter, dtype) -> (version key, (a, b, a^T, b^T))

    def get(self, layer, adapter: str, dtype):
        A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        hit = self.entries.get((id(layer), adapter, dtype))
        if hit is None or hit[0] != _version_key(A, B):
            self.refresh(adapter, dtype, also=layer)
            hit = self.entries[(id(layer), adapter, dtype)]
        return hit[1]

    @torch.no_grad()
    def refresh(self, adapter: str, dtype, also=None) -> None:
        """Bring every stale copy of `adapter` in `dtype` up to its masters (`also`: a layer outside self.layers)."""
        dst, src, fresh = [], [], []
        layers = self.layers if also is None or any(m is also for m in self.layers) else [*self.layers, also]
        for m in layers:
            if adapter not in m.lora_A:
                continue
            A, B = m.lora_A[adapter].weight, m.lora_B[adapter].weight
            key = _version_key(A, B)
            hit = self.entries.get((id(m), adapter, dtype))
            if hit is not None and hit[0] == key:
                continue
            if hit is None or hit[1][0].shape != A.shape or hit[1][1].shape != B.shape or hit[1][0].device != A.device:
                with torch.inference_mode(False):  # buffers outlive a first call under inference_mode
                    a = torch.empty(A.shape, dtype=dtype, device=A.device)
                    b = torch.empty(B.shape, dtype=dtype, device=B.device)
                hit = (None, (a, b, _t(a), _t(b)))
            dst += hit[1][:2]
            src += [A, B]
            fresh.append((m, key, hit[1]))
        if dst:
            torch._foreach_copy_(dst, src)
        for m, key, tensors in fresh:
            self.entries[(id(m), adapter, dtype)] = (key, tensors)


def _t(w: torch.Tensor):
    """The transpose a Linear multiplies by (None for a convolution kernel, which is not transposed)."""
    return w.t() if w.ndim == 2 else None


def _base_weights(base, dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(weight, bias, weight^T) of the frozen base layer in `dtype`: views made once when the base is stored in
    `dtype`; otherwise cast per call, as autocast does (a cached copy would double the base's memory)."""
    W, bias = base.weight, base.bias
    if W.dtype != dtype or torch.compiler.is_compiling():
        W = W.to(dtype)
        return W, bias.to(dtype) if bias is not None else None, _t(W)
    key = (W.data_ptr(), None if bias is None else bias.data_ptr(), dtype)
    hit = base.__dict__.get("_stepdistill_base")
    if hit is None or hit[0] != key:
        hit = (key, (W, bias, _t(W)))
        base.__dict__["_stepdistill_base"] = hit
    return hit[1]


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor):
    """The dtype the base layer computes in: autocast's when it is on, else the base weight's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _low_precision_lora(layer, x: torch.Tensor) -> bool:
    """Whether the low-rank term may compute in the base's low precision: under autocast (as autocast computes it), or
    when the run asked for it without autocast (use_fused_lora(low_precision=True): loop.mixed_precision=bf16_pure).
    Otherwise a low-precision base without autocast keeps PEFT's forward, which computes the term in fp32."""
    return torch.is_autocast_enabled(x.device.type) or layer.__dict__.get("_stepdistill_low_precision", False)


def _fusable(layer, adapter: str) -> bool:
    """Vanilla LoRA on an nn.Linear or a plain nn.Conv2d: what the fused kernels compute exactly."""
    if adapter in getattr(layer, "lora_variant", {}) or not isinstance(layer.lora_dropout[adapter], torch.nn.Identity):
        return False
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        return False
    base = layer.base_layer
    if isinstance(base, torch.nn.Conv2d):
        return (base.groups == 1 and tuple(base.dilation) == (1, 1) and base.padding_mode == "zeros"
                and not isinstance(base.padding, str))
    return type(base) is torch.nn.Linear


def _plain_linear(base) -> bool:
    """An nn.Linear whose forward is F.linear (not a subclass with hooks of its own, nor a sharded DTensor)."""
    return type(base) is torch.nn.Linear and not base._forward_hooks and not base._forward_pre_hooks and \
        type(base.weight) in (torch.Tensor, torch.nn.Parameter)


def _lora_term(layer, adapter: str, x, y, dtype):
    """y += scale * B(A(x)) in place (no grad): the rows of one adapter in a mixed-adapter call."""
    a, b, a_t, b_t = _compute_weights(layer, adapter, dtype)
    scale = layer.scaling[adapter]
    x = x.to(dtype)
    base = layer.base_layer
    if isinstance(base, torch.nn.Conv2d):
        conv = torch.nn.functional.conv2d
        y.add_(conv(conv(x, a, None, base.stride, base.padding), b), alpha=scale)
    else:
        y.view(-1, y.shape[-1]).addmm_(torch.mm(x.reshape(-1, x.shape[-1]), a_t), b_t, alpha=scale)


def _fused_forward(layer, x, *args, **kwargs):
    """The replacement of a PEFT LoRA layer's forward (installed per instance by use_fused_lora)."""
    adapter_names = kwargs.get("adapter_names")
    peft_forward = type(layer).forward
    if args or layer.merged or (set(kwargs) - {"adapter_names"}):
        return peft_forward(layer, x, *args, **kwargs)
    base = layer.base_layer
    if layer.disable_adapters:  # the teacher: the bare base, nothing else
        return _base_linear(base, x) if _plain_linear(base) else base(x)
    if adapter_names is not None:
        segments = layer.__dict__.get("_stepdistill_segments")
        if segments is None or torch.is_grad_enabled() or not all(
                _fusable(layer, n) for n, *_ in segments if n in layer.lora_A):
            return peft_forward(layer, x, *args, **kwargs)
        y = _base_linear(base, x) if _plain_linear(base) else base(x)
        dtype = y.dtype
        if any(n in layer.lora_A and layer.lora_A[n].weight.dtype != dtype for n, *_ in segments) and \
                not _low_precision_lora(layer, x):
            return peft_forward(layer, x, *args, **kwargs)  # a low-precision base without autocast: PEFT's fp32 LoRA
        for name, start, stop in segments:
            if name in layer.lora_A:
                _lora_term(layer, name, x[start:stop], y[start:stop], dtype)
        return y
    active = [n for n in layer.active_adapters if n in layer.lora_A]
    if not active:
        return _base_linear(base, x) if _plain_linear(base) else base(x)
    if len(active) > 1 or not _fusable(layer, active[0]) or base.weight.requires_grad or (
            base.bias is not None and base.bias.requires_grad):
        return peft_forward(layer, x, *args, **kwargs)
    (adapter,) = active
    dtype = _compute_dtype(x, base.weight)
    A = layer.lora_A[adapter].weight
    if dtype != A.dtype and not _low_precision_lora(layer, x):
        return peft_forward(layer, x, *args, **kwargs)  # a low-precision base without autocast: PEFT's fp32 LoRA
    a, b, a_t, b_t = _compute_weights(layer, adapter, dtype)
    weight, bias, weight_t = _base_weights(base, dtype)
    scale = float(layer.scaling[adapter])
    B = layer.lora_B[adapter].weight
    if isinstance(base, torch.nn.Conv2d):
        return _LoraConv2d.apply(x.to(dtype), weight, bias, A, B, a, b, scale, tuple(base.stride), tuple(base.padding))
    return _LoraLinear.apply(x.to(dtype), weight, bias, A, B, a, b, scale, weight_t, a_t, b_t)


def lora_layer_modules(unet) -> list:
    """The PEFT LoRA layers of `unet` (those with adapters and a base layer)."""
    return [m for m in unet.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")
            and hasattr(m, "_disable_adapters")]


def use_fused_lora(unet, on: bool = True, low_precision: bool = False) -> int:
    """Run every LoRA layer of `unet` through the fused path (on) or PEFT's own forward (off); returns the count.

    Per instance, so PEFT's classes, parameters and keys are untouched; layers the fused kernels do not cover (DoRA,
    dropout, a LoRA bias, grouped or dilated convolutions, several active adapters at once) keep PEFT's forward at
    call time. `low_precision`: on a low-precision base without autocast (bf16 end to end), compute the low-rank term
    from compute copies in the base's dtype, as autocast would, instead of falling back to PEFT's fp32 term.
    """
    if low_precision and not on:
        raise ValueError("low-precision LoRA compute is a mode of the fused path: set model.lora_kernel=fused, or "
                         "loop.mixed_precision=bf16 (autocast) with model.lora_kernel=peft")
    layers = lora_layer_modules(unet)
    copies = _ComputeCopies(layers)  # shared: one refresh brings every layer's copies up to date
    for m in layers:
        if on:
            m.forward = _fused_forward.__get__(m)
            m.__dict__["_stepdistill_low_precision"] = low_precision
            m.__dict__["_stepdistill_copies"] = copies
        else:
            for key in ("forward", "_stepdistill_compute", "_stepdistill_low_precision", "_stepdistill_copies"):
                m.__dict__.pop(key, None)
    return len(layers)


def segments_of(names: Sequence[str]) -> list[tuple[str, int, int]]:
    """Runs of equal names -> [(name, start, stop)]: the contiguous rows each adapter serves in a mixed call."""
    out: list[tuple[str, int, int]] = []
    for i, n in enumerate(names):
        if out and out[-1][0] == n:
            out[-1] = (n, out[-1][1], i + 1)
        else:
            out.append((n, i, i + 1))
    return out
