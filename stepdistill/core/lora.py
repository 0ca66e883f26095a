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
        self.groups: dict = {}  # (ids of layers, adapter, dtype) -> (a_cat, a_cat^T, b3, b3^T, (each layer's a))

    def get(self, layer, adapter: str, dtype):
        A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        hit = self.entries.get((id(layer), adapter, dtype))
        if hit is None or hit[0] != _version_key(A, B):
            self.refresh(adapter, dtype, also=layer)
            hit = self.entries[(id(layer), adapter, dtype)]
        return hit[1]

    def group(self, layers, adapter: str, dtype) -> tuple[torch.Tensor, ...]:
        """(a_cat, a_cat^T, b3, b3^T) of `layers` (equal ranks and widths), up to date: A_1..A_m stacked by rows
        ([m r, in]) and B_1..B_m stacked ([m, out, r]). Each layer's own compute copies are views into these buffers
        (dense, so the one refresh stays on the foreach kernel's fast path), so the refresh that brings the layers up
        to date brings the group up to date too."""
        key = (tuple(id(m) for m in layers), adapter, dtype)
        hit = self.groups.get(key)
        if hit is None or any(self.entries.get((id(m), adapter, dtype), (None, (None,)))[1][0] is not a
                              for m, a in zip(layers, hit[4])):
            hit = self.groups[key] = self._allocate_group(layers, adapter, dtype)
        for m in layers:
            self.get(m, adapter, dtype)  # the first stale layer refreshes every stale one, in one foreach copy
        return hit[:4]

    def _allocate_group(self, layers, adapter: str, dtype) -> tuple:
        A, B = layers[0].lora_A[adapter].weight, layers[0].lora_B[adapter].weight
        (r, n_in), n_out, m = A.shape, B.shape[0], len(layers)
        with torch.inference_mode(False):  # buffers outlive a first call under inference_mode
            a_cat = torch.empty(m * r, n_in, dtype=dtype, device=A.device)
            b3 = torch.empty(m, n_out, r, dtype=dtype, device=B.device)
        views = []
        for i, layer in enumerate(layers):
            a, b = a_cat[i * r:(i + 1) * r], b3[i]
            self.entries[(id(layer), adapter, dtype)] = (None, (a, b, a.t(), b.t()))  # stale until refreshed
            views.append(a)
        return a_cat, a_cat.t(), b3, b3.transpose(1, 2), tuple(views)

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


# How _fused_forward runs one call of one layer (_route): PEFT's own forward, the bare base (the teacher, or no adapter
# of this layer active), the per-adapter rows of a mixed-adapter call, or ("lora", adapter, dtype): the fused node.
_PEFT, _BASE, _MIXED = ("peft",), ("base",), ("mixed",)


def _route(layer, x, args=(), kwargs=None) -> tuple:
    """The fused path's decision for one call of `layer` on `x` (shared by _fused_forward and fused_linears, so a
    group of layers fuses exactly where each layer alone would take the fused path)."""
    kwargs = kwargs or {}
    if args or layer.merged or (set(kwargs) - {"adapter_names"}):
        return _PEFT
    if layer.disable_adapters:
        return _BASE
    if kwargs.get("adapter_names") is not None:
        return _MIXED
    active = [n for n in layer.active_adapters if n in layer.lora_A]
    if not active:
        return _BASE
    base = layer.base_layer
    if len(active) > 1 or not _fusable(layer, active[0]) or _trainable_base(base):
        return _PEFT
    dtype = _compute_dtype(x, base.weight)
    if dtype != layer.lora_A[active[0]].weight.dtype and not _low_precision_lora(layer, x):
        return _PEFT  # a low-precision base without autocast: PEFT's fp32 LoRA
    return ("lora", active[0], dtype)


def _trainable_base(base) -> bool:
    return base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)


def _mixed_forward(layer, x, kwargs):
    """A mixed-adapter call: the base once on every row, each adapter's low-rank term on its own contiguous rows."""
    peft_forward = type(layer).forward
    segments = layer.__dict__.get("_stepdistill_segments")
    if segments is None or torch.is_grad_enabled() or not all(
            _fusable(layer, n) for n, *_ in segments if n in layer.lora_A):
        return peft_forward(layer, x, **kwargs)
    base = layer.base_layer
    y = _base_linear(base, x) if _plain_linear(base) else base(x)
    dtype = y.dtype
    if any(n in layer.lora_A and layer.lora_A[n].weight.dtype != dtype for n, *_ in segments) and \
            not _low_precision_lora(layer, x):
        return peft_forward(layer, x, **kwargs)  # a low-precision base without autocast: PEFT's fp32 LoRA
    for name, start, stop in segments:
        if name in layer.lora_A:
            _lora_term(layer, name, x[start:stop], y[start:stop], dtype)
    return y


def _fused_forward(layer, x, *args, **kwargs):
    """The replacement of a PEFT LoRA layer's forward (installed per instance by use_fused_lora)."""
    route = _route(layer, x, args, kwargs)
    if route is _PEFT:
        return type(layer).forward(layer, x, *args, **kwargs)
    base = layer.base_layer
    if route is _BASE:  # the teacher: the bare base, nothing else
        return _base_linear(base, x) if _plain_linear(base) else base(x)
    if route is _MIXED:
        return _mixed_forward(layer, x, kwargs)
    _, adapter, dtype = route
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    a, b, a_t, b_t = _compute_weights(layer, adapter, dtype)
    weight, bias, weight_t = _base_weights(base, dtype)
    scale = float(layer.scaling[adapter])
    if isinstance(base, torch.nn.Conv2d):
        return _LoraConv2d.apply(x.to(dtype), weight, bias, A, B, a, b, scale, tuple(base.stride), tuple(base.padding))
    return _LoraLinear.apply(x.to(dtype), weight, bias, A, B, a, b, scale, weight_t, a_t, b_t)


# ---- several projections of one input as one (an attention's q, k, v) -------------------------------------------


class _LoraProjections(torch.autograd.Function):
    """[y_1 | ... | y_m] = x W_cat^T + bias_cat + scale [h_1 b_1^T | ... | h_m b_m^T], h = x a_cat^T: the m LoRA
    Linear layers that read one input (an attention's q, k and v) as one node. The base GEMM and the down-projection
    are one GEMM each over the concatenated weights; the up-projections are one batched GEMM written into the output's
    column blocks (a block-diagonal B would multiply m - 1 zero blocks per block, in every pass). Gradients for x and
    each layer's own fp32 masters (A_1, B_1, ..., A_m, B_m)."""

    @staticmethod
    def forward(ctx, x, w, w_t, bias, a_cat, a_cat_t, b3, b3_t, scale, *masters):
        x2 = _rows(x)
        n, (m, r, n_out) = x2.shape[0], b3_t.shape
        h = torch.mm(x2, a_cat_t)  # [n, m r]
        y = torch.mm(x2, w_t) if bias is None else torch.addmm(bias, x2, w_t)  # [n, m out]
        y.view(n, m, n_out).transpose(0, 1).baddbmm_(h.view(n, m, r).transpose(0, 1), b3_t, alpha=scale)
        ctx.save_for_backward(x2, w, a_cat, b3, h)
        ctx.scale, ctx.x_shape, ctx.dtypes = scale, x.shape, [t.dtype for t in masters]
        return _unrows(y, x.shape)

    @staticmethod
    def backward(ctx, g):
        x2, w, a_cat, b3, h = ctx.saved_tensors
        (m, n_out, r), scale = b3.shape, ctx.scale
        need_x, need_masters = ctx.needs_input_grad[0], ctx.needs_input_grad[9:]
        g2 = _rows(g)
        if not g2.is_contiguous():  # the column blocks below are views of a row-major matrix
            g2 = g2.contiguous()
        n = g2.shape[0]
        g3 = g2.view(n, m, n_out).transpose(0, 1)  # [m, n, out]: each layer's output gradient
        grad_x, grads = None, [None] * (2 * m)
        if not (need_x or any(need_masters)):
            return grad_x, *[None] * 8, *grads
        gh3 = torch.bmm(g3, b3)  # [m, n, r]: d loss / d h, per layer
        if scale != 1.0:
            gh3.mul_(scale)
        gh = gh3.transpose(0, 1).reshape(n, m * r)
        if need_x:
            grad_x = _unrows(torch.mm(g2, w).addmm_(gh, a_cat), ctx.x_shape)
        if any(need_masters[0::2]):
            grad_a = torch.mm(gh.t(), x2).to(ctx.dtypes[0]).view(m, r, -1).unbind(0)
            grads[0::2] = [ga if need else None for ga, need in zip(grad_a, need_masters[0::2])]
        if any(need_masters[1::2]):
            grad_b = torch.bmm(g3.transpose(1, 2), h.view(n, m, r).transpose(0, 1))  # [m, out, r]
            if scale != 1.0:
                grad_b.mul_(scale)
            grad_b = grad_b.to(ctx.dtypes[1]).unbind(0)
            grads[1::2] = [gb if need else None for gb, need in zip(grad_b, need_masters[1::2])]
        return grad_x, *[None] * 8, *grads


def _hooked(module) -> bool:
    """Hooks that module.__call__ would run (a mixed-adapter call injects adapter_names with one): calling a layer's
    weights directly would skip them."""
    from torch.nn.modules import module as nn_module

    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or nn_module._global_forward_hooks
                or nn_module._global_forward_pre_hooks or nn_module._global_backward_hooks
                or nn_module._global_backward_pre_hooks)


def _on_fused_path(layer) -> bool:
    """A LoRA Linear whose forward is the fused path's (use_fused_lora on), called as module.__call__ would call it."""
    forward = layer.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _fused_forward and not _hooked(layer) and \
        _plain_linear(layer.base_layer) and "forward" not in layer.base_layer.__dict__


def _concat_base(layers, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(W_cat, W_cat^T, bias_cat) of the frozen bases of `layers` in `dtype`, concatenated once (cached on the first
    layer, keyed on the bases' storages and version counters: a load or a move makes a new one); None when the
    bases differ in dtype or device. Stored in the bases' dtype: the cast to another compute dtype is per call, one
    cast for the group, as _base_weights does per layer."""
    bases = [m.base_layer for m in layers]
    W0 = bases[0].weight
    if any(b.weight.dtype != W0.dtype or b.weight.device != W0.device for b in bases):
        return None
    key = tuple((t.data_ptr(), t._version) if t is not None else None for b in bases for t in (b.weight, b.bias))
    cache = layers[0].__dict__.setdefault("_stepdistill_concat", {})
    hit = cache.get(tuple(id(m) for m in layers))
    if hit is None or hit[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            w = torch.cat([b.weight for b in bases])
            bias = None
            if any(b.bias is not None for b in bases):
                bias = torch.cat([b.bias if b.bias is not None else b.weight.new_zeros(b.out_features) for b in bases])
        hit = (key, (w, w.t(), bias))
        cache[tuple(id(m) for m in layers)] = hit
    w, w_t, bias = hit[1]
    if w.dtype != dtype:
        w = w.to(dtype)
        w_t, bias = w.t(), bias.to(dtype) if bias is not None else None
    return w, w_t, bias


def _group_lora(layers, adapter: str, dtype) -> tuple[torch.Tensor, ...]:
    """(a_cat, a_cat^T, b3, b3^T) of `adapter` on `layers` in `dtype`: compute copies in one buffer each
    (_ComputeCopies.group), or, in the masters' own dtype, the masters stacked per call."""
    As = [m.lora_A[adapter].weight for m in layers]
    Bs = [m.lora_B[adapter].weight for m in layers]
    if all(t.dtype == dtype for t in (*As, *Bs)):
        a_cat, b3 = torch.cat([A.detach() for A in As]), torch.stack([B.detach() for B in Bs])
        return a_cat, a_cat.t(), b3, b3.transpose(1, 2)
    return layers[0].__dict__["_stepdistill_copies"].group(layers, adapter, dtype)


def fused_linears(layers, x: torch.Tensor) -> torch.Tensor | None:
    """x through several LoRA Linear layers that read the same input (an attention's q, k and v) as ONE projection:
    the layers' outputs side by side along the last dimension, [layer_1(x) | ... | layer_m(x)], from one GEMM over
    their concatenated frozen bases and, when their adapter is on, one down-projection and one batched up-projection
    (_LoraProjections). None, for the caller to call each layer, wherever the fused path would not run every layer
    the same way: a layer on PEFT's forward, in a mixed-adapter call or with hooks, different adapters, ranks,
    scales or widths, a trainable base, and under torch.compile (whose graphs keep the separate projections)."""
    if torch.compiler.is_compiling() or not all(_on_fused_path(m) for m in layers):
        return None
    routes = {_route(m, x) for m in layers}
    if len(routes) != 1:
        return None
    (route,) = routes
    if route is not _BASE and route[0] != "lora" or any(_trainable_base(m.base_layer) for m in layers):
        return None
    if len({m.base_layer.out_features for m in layers}) != 1:
        return None
    dtype = _compute_dtype(x, layers[0].base_layer.weight) if route is _BASE else route[2]
    base = _concat_base(layers, dtype)
    if base is None:
        return None
    w, w_t, bias = base
    if route is _BASE:  # the teacher: the bare bases as one GEMM, nothing else
        x2 = _rows(x.to(dtype))
        return _unrows(torch.mm(x2, w_t) if bias is None else torch.addmm(bias, x2, w_t), x.shape)
    adapter = route[1]
    copies = {id(m.__dict__.get("_stepdistill_copies")) for m in layers}
    if len({float(m.scaling[adapter]) for m in layers}) != 1 or len(copies) != 1 or \
            len({m.lora_A[adapter].weight.shape for m in layers}) != 1:
        return None
    masters = [t for m in layers for t in (m.lora_A[adapter].weight, m.lora_B[adapter].weight)]
    if len({t.dtype for t in masters[0::2]}) != 1 or len({t.dtype for t in masters[1::2]}) != 1:
        return None
    a_cat, a_cat_t, b3, b3_t = _group_lora(layers, adapter, dtype)
    return _LoraProjections.apply(x.to(dtype), w, w_t, bias, a_cat, a_cat_t, b3, b3_t,
                                  float(layers[0].scaling[adapter]), *masters)


def lora_layer_modules(unet) -> list:
    """The PEFT LoRA layers of `unet` (those with adapters and a base layer)."""
    return [m for m in unet.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")
            and hasattr(m, "_disable_adapters")]


def use_fused_lora(unet, on: bool = True, low_precision: bool = False) -> int:
    """Run every LoRA layer of `unet` through the fused path (on) or PEFT's own forward (off); returns the count.

    Per instance, so PEFT's classes, parameters and keys are untouched; layers the fused kernels do not cover (DoRA,
    dropout, a LoRA bias, grouped or dilated convolutions, several active adapters at once) keep PEFT's forward at
    call time. `low_precision`: on a low-precision base without autocast (bf16 end to end), compute the low-rank term
    from compute copies in the base's dtype, as autocast would, instead of falling back to PEFT's fp32 term. With the
    fused path on, our attention processor (core.attn_processor) runs an attention's q, k and v as one projection
    (fused_linears) wherever each of them alone would take the fused path.
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
            for key in ("forward", "_stepdistill_compute", "_stepdistill_low_precision", "_stepdistill_copies",
                        "_stepdistill_concat"):
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
