"""Network passes of a piece of code, counted by a forward pre-hook on the UNet (docs/benchmarks.md, "Passes").

Each call of the UNet's forward is recorded as a `Pass`: which adapter ran it (None: the bare base, i.e. the teacher;
"a+b": one batched call with per-sample adapters), its batch, whether autograd recorded it (a backward follows when
its output reaches a loss), and whether it ran to the end (the GAN and discriminator feature reads stop after the
mid block). Counting changes nothing it counts.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .denoiser import lora_layers


@dataclass(frozen=True)
class Pass:
    adapter: str | None  # None: the frozen base (teacher); "a+b": per-sample adapters in one call
    batch: int
    grad: bool  # autograd was on: a backward can follow
    full: bool = True  # False: stopped early (features read up to the mid block)

    def label(self) -> str:
        kind = "fwd+bwd" if self.grad else "fwd"
        return f"{self.adapter or 'base'}:{kind}x{self.batch}" + ("" if self.full else "(partial)")


def _active(unet) -> str | None:
    """The adapter a forward of `unet` runs under now: the mixed-batch names if set, else the layers' active one."""
    mixed = getattr(unet, "_stepdistill_mixed_adapters", None)
    if mixed is not None:
        return "+".join(dict.fromkeys("base" if n == "__base__" else n for n in mixed))
    for m in lora_layers(unet):
        if m._disable_adapters:
            return None
        if m._active_adapter:
            return m._active_adapter[0]
    return None


class PassCounter:
    """Records every forward of `unet` while active: `with PassCounter(unet) as c: ...; c.passes`."""

    def __init__(self, unet):
        self.unet, self.passes, self._open, self._handles = unet, [], [], []

    def _pre(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))  # a UNet, or a transformer
        self._open.append(len(self.passes))
        self.passes.append(Pass(_active(self.unet), int(x.shape[0]), torch.is_grad_enabled(), full=False))

    def _post(self, module, args, kwargs, output):
        i = self._open.pop()
        p = self.passes[i]
        self.passes[i] = Pass(p.adapter, p.batch, p.grad, full=True)

    def __enter__(self):
        self._handles = [self.unet.register_forward_pre_hook(self._pre, with_kwargs=True),
                         self.unet.register_forward_hook(self._post, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles, self._open = [], []

    def summary(self) -> dict:
        """Totals: calls, sample rows through the network forward, rows also back-propagated, per-label counts."""
        return {
            "calls": len(self.passes),
            "forward_rows": sum(p.batch for p in self.passes),
            "grad_rows": sum(p.batch for p in self.passes if p.grad),
            "by_label": dict(Counter(p.label() for p in self.passes)),
        }


@contextmanager
def count_passes(unet):
    """Shorthand: `with count_passes(unet) as c:`; read c.passes / c.summary() afterwards."""
    with PassCounter(unet) as counter:
        yield counter
