"""Fidelity and diversity of a generated set against a real one, in any feature space.

Precision and recall: Kynkaanniemi et al. 2019 (arXiv 1904.06991), k-NN balls around each set's points.
Density and coverage: Naeem et al. 2020 (arXiv 2002.09797), k-NN balls around the real points only.
A mode-collapsed generator keeps precision (its samples are realistic) and loses recall and coverage (it misses
parts of the real distribution). FID mixes both; these separate them.
"""

from __future__ import annotations

import torch


def _pairwise(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Euclidean distances [len(a), len(b)] in float64."""
    a, b = a.double(), b.double()
    return torch.cat([torch.cdist(a[i : i + chunk], b) for i in range(0, len(a), chunk)])


def knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each point of x to its k-th nearest other point of x."""
    if len(x) <= k:
        raise ValueError(f"need more than k = {k} points for k-NN radii (got {len(x)}): evaluate more images")
    d = _pairwise(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is its own nearest neighbour at distance 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Precision: fraction of fake points inside some real k-NN ball; recall: real points inside some fake ball."""
    d = _pairwise(real, fake)  # [R, F]
    precision = (d <= knn_radii(real, k)[:, None]).any(0).double().mean()
    recall = (d <= knn_radii(fake, k)[None, :]).any(1).double().mean()
    return float(precision), float(recall)


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> tuple[float, float]:
    """Density: mean count of real k-NN balls holding each fake point, / k (about 1 when the sets match);
    coverage: fraction of real balls that hold at least one fake point."""
    d = _pairwise(real, fake)
    inside = d <= knn_radii(real, k)[:, None]  # [R, F]
    density = inside.double().sum(0).mean() / k
    coverage = inside.any(1).double().mean()
    return float(density), float(coverage)


def total_variation(p_counts, q_counts) -> float:
    """Total variation distance between two histograms over the same bins (0 = equal, 1 = disjoint)."""
    p = torch.as_tensor(p_counts, dtype=torch.float64)
    q = torch.as_tensor(q_counts, dtype=torch.float64)
    return float(0.5 * (p / p.sum().clamp(min=1) - q / q.sum().clamp(min=1)).abs().sum())
