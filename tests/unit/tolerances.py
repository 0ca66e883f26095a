"""Tolerances for comparing two float computations of the same values that reduce in different orders (a batched
call against the calls one by one, a sharded sum against a whole one), set from the dtype and the reduction size
instead of from one lucky run: kernels pick other blockings for other batch sizes, and a BLAS its thread split by load.
"""

from __future__ import annotations

import math

import torch


def max_fan_in(module: torch.nn.Module) -> int:
    """The longest dot product a layer of `module` computes: in_features of a Linear, in_channels x kernel of a conv."""
    fan = 1
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            fan = max(fan, m.in_features)
        elif isinstance(m, torch.nn.modules.conv._ConvNd):
            fan = max(fan, m.in_channels // m.groups * math.prod(m.kernel_size))
    return fan


def reduction_atol(dtype: torch.dtype, reduction: int, scale: float, depth: int = 1) -> float:
    """Absolute tolerance for values of magnitude `scale` whose sums of `reduction` terms ran in different orders.

    A sum of n rounded terms errs by about sqrt(n) eps |value| when rounding errors are independent (Higham, Accuracy
    and Stability of Numerical Algorithms, 2nd ed., sec. 2.8; n eps is the worst case); `depth` such sums in a row
    (a network's layers) add up, and a factor 4 keeps the rare tail inside.
    """
    return 4.0 * depth * torch.finfo(dtype).eps * math.sqrt(reduction) * scale


def rounding_atol(dtype: torch.dtype, scale: float, units: float = 1.0) -> float:
    """Absolute tolerance for two computations of values of magnitude `scale` that run the same kernels on the same
    inputs in the same order, so that they may differ only by `units` final roundings: the unit roundoff eps / 2
    (Higham, sec. 2.1) at that scale. A difference in what either computes (another timestep, another conditioning)
    moves a bf16 output by many such units."""
    return units * torch.finfo(dtype).eps / 2 * scale
