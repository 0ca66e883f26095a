"""torch.compile of a denoiser, whole or by region (model.compile; issue 33).

Regional compilation compiles each repeated block (FamilyModel.compile_units: a UNet's resnets and transformer blocks,
a DiT's blocks) in place with nn.Module.compile. Blocks of one class and shape run the same code, so dynamo traces and
inductor generates one graph for all of them: compile time is that of a few distinct blocks rather than of the whole
network, while the blocks, which hold nearly all of the FLOPs and kernel launches, still run fused code. What lies
between the blocks (embeddings, up/down sampling, gradient checkpointing's wrappers, adapter switching) stays eager.

Compiled in place, parameter names are unchanged: checkpoints, exports and `adapter_parameters` see the same keys.
"""

from __future__ import annotations

import torch

# The attribute a compiled denoiser carries: "regional" or "full" (read by core.denoiser.denoise_together).
COMPILED_ATTR = "_stepdistill_compiled"
# Graphs one code object may keep before dynamo falls back to eager with only a log line: a dmd iteration needs one
# per adapter (teacher, student, fake score) x grad mode x batch shape, times the distinct block shapes of a UNet.
RECOMPILE_LIMIT = 256


def _raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * limit)


def compile_regions(net: torch.nn.Module, units, **options) -> int:
    """nn.Module.compile each of `units` (blocks inside `net`) in place; returns how many. `options` go to
    torch.compile (dynamic, backend, mode)."""
    units = list(units)
    if not units:
        raise ValueError(f"regional compile: the {type(net).__name__} lists no blocks to compile (FamilyModel."
                         "compile_units); use model.compile=full or off")
    _raise_recompile_limit()
    for unit in units:
        unit.compile(**options)
    object.__setattr__(net, COMPILED_ATTR, "regional")
    return len(units)


def compile_whole(net: torch.nn.Module, **options) -> None:
    """nn.Module.compile the whole network in place (one graph per adapter, grad mode and shape)."""
    _raise_recompile_limit()
    net.compile(**options)
    object.__setattr__(net, COMPILED_ATTR, "full")


def compiled_mode(net) -> str:
    """How `net` was compiled: "regional", "full" or "off"."""
    mode = getattr(net, COMPILED_ATTR, None)
    if mode is None and getattr(net, "_compiled_call_impl", None) is not None:
        return "full"
    return mode or "off"


def describe_units(units) -> str:
    """'36 units: 22 ResnetBlock2D, 14 BasicTransformerBlock' (the log line of what was compiled)."""
    counts: dict[str, int] = {}
    for u in units:
        counts[type(u).__name__] = counts.get(type(u).__name__, 0) + 1
    return f"{sum(counts.values())} blocks: " + ", ".join(f"{n} {name}" for name, n in counts.items())
