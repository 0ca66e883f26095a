"""Precision/recall and density/coverage separate fidelity from diversity on sets whose answer is known."""

import pytest
import torch

from stepdistill.metrics.diversity import density_coverage, knn_radii, precision_recall, total_variation


def _mixture(n, modes, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])[modes]
    pick = torch.randint(0, len(centres), (n,), generator=g)
    return centres[pick] + 0.5 * torch.randn((n, 2), generator=g)


def test_same_distribution_scores_near_one():
    real, fake = _mixture(600, [0, 1, 2, 3], 0), _mixture(600, [0, 1, 2, 3], 1)
    p, r = precision_recall(real, fake)
    d, c = density_coverage(real, fake)
    assert p > 0.9 and r > 0.9 and c > 0.9 and 0.8 < d < 1.2


def test_mode_collapse_keeps_precision_and_loses_recall_and_coverage():
    real, collapsed = _mixture(600, [0, 1, 2, 3], 0), _mixture(600, [0], 1)
    p, r = precision_recall(real, collapsed)
    _, c = density_coverage(real, collapsed)
    assert p > 0.9
    assert r < 0.4 and c < 0.4  # one of four modes


def test_far_away_samples_have_no_precision():
    real, fake = _mixture(300, [0, 1], 0), _mixture(300, [0, 1], 1) + 100.0
    p, r = precision_recall(real, fake)
    d, c = density_coverage(real, fake)
    assert p == r == d == c == 0.0


def test_knn_radius_excludes_the_point_itself_and_needs_enough_points():
    x = torch.tensor([[0.0], [1.0], [3.0]])
    assert knn_radii(x, 1).tolist() == [1.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="more than k"):
        knn_radii(x, 3)


def test_total_variation():
    assert total_variation([1, 1], [1, 1]) == 0.0
    assert total_variation([5, 0], [0, 3]) == 1.0
    assert total_variation([3, 1], [1, 1]) == pytest.approx(0.25)
