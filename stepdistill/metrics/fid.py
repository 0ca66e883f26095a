"""Frechet distance, kernel distance and streaming feature statistics (pure numpy, float64).

These are the statistics half of FID/KID: they take features (Inception pool3, or any embedding such as the
toy world's) and know nothing about images, models or generation. `eval/fid.py` feeds them real features.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _sqrtm_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root S^{1/2} of a PSD matrix through its eigendecomposition S = V diag(w) V^T."""
    w, v = np.linalg.eigh(sigma)
    # Sample covariances are PSD up to round-off; tiny negative eigenvalues are noise, not signal.
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(S1^{1/2} S2 S1^{1/2})), the eigenvalue form of FID's cross term."""
    s1_half = _sqrtm_psd(sigma1)
    # S1^{1/2} S2 S1^{1/2} is similar to S1 S2 but symmetric, so eigvalsh applies and its eigenvalues are real.
    m = s1_half @ sigma2 @ s1_half
    eigenvalues = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) for N(mu1, S1), N(mu2, S2) (Heusel et al. 2017, eq. 6)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"feature statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
            f"{sigma2.shape}; compute both sides with the same feature extractor"
        )
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def kernel_distance(feats1, feats2, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0) -> float:
    """KID: unbiased MMD^2, cubic kernel k(x, y) = (x.y / d + 1)^3, mean over subsets (Binkowski et al. 2018, eq. 3)."""
    # Convert subsets, not the whole sets: 40k reference features in float64 would be 650 MB.
    feats1, feats2 = np.asarray(feats1), np.asarray(feats2)
    d = feats1.shape[1]
    m = min(feats1.shape[0], feats2.shape[0], max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {feats1.shape[0]} and {feats2.shape[0]}")
    rng = np.random.RandomState(seed)
    total = 0.0
    for _ in range(num_subsets):
        # Same draw order as clean-fid (second set first), so a shared seed gives the same subsets.
        x = feats2[rng.choice(feats2.shape[0], m, replace=False)].astype(np.float64)
        y = feats1[rng.choice(feats1.shape[0], m, replace=False)].astype(np.float64)
        k_xx_yy = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        k_xy = (x @ y.T / d + 1) ** 3
        total += (k_xx_yy.sum() - np.diag(k_xx_yy).sum()) / (m - 1) - k_xy.sum() * 2 / m
    return float(total / num_subsets / m)


class FeatureStats:
    """Running float64 mean and covariance of feature vectors, mergeable across batches and processes.

    Uses the pairwise update of Chan et al. (1979) on (n, mean, M2 = sum of centred outer products), which
    stays accurate where the naive sum(x x^T) - n mu mu^T loses digits. `cov` is unbiased (divides by n - 1),
    like `np.cov`, so statistics match clean-fid's on the same features. With `keep_features=True` the raw
    features are also kept (float32) for KID.
    """

    def __init__(self, dim: int | None = None, keep_features: bool = False):
        self.n = 0
        self.dim = dim
        self.keep_features = keep_features
        self._mean = None if dim is None else np.zeros(dim, np.float64)
        self._m2 = None if dim is None else np.zeros((dim, dim), np.float64)
        self._kept: list[np.ndarray] = []
        self.meta: dict = {}

    def _merge_moments(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if self._mean is None:
            self.dim = mean_b.shape[0]
            self._mean = np.zeros(self.dim, np.float64)
            self._m2 = np.zeros((self.dim, self.dim), np.float64)
        if mean_b.shape[0] != self.dim:
            raise ValueError(f"feature dimension {mean_b.shape[0]} does not match these statistics' {self.dim}")
        n = self.n + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.n * n_b / n)
        self.n = n

    def update(self, feats) -> FeatureStats:
        """Add a batch of features, shape [B, D] (numpy array or torch tensor)."""
        if hasattr(feats, "detach"):
            feats = feats.detach().cpu().double().numpy()
        feats = np.asarray(feats, np.float64)
        if feats.ndim != 2:
            raise ValueError(f"features must be [batch, dim], got shape {feats.shape}")
        if feats.shape[0] == 0:
            return self
        mean_b = feats.mean(axis=0)
        centred = feats - mean_b
        self._merge_moments(feats.shape[0], mean_b, centred.T @ centred)
        if self.keep_features:
            self._kept.append(feats.astype(np.float32))
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Fold another FeatureStats (another shard or process) into this one."""
        if other.n == 0:
            return self
        self._merge_moments(other.n, other._mean, other._m2)
        if self.keep_features:
            if not other.keep_features:
                raise ValueError("cannot merge statistics without kept features into ones that keep them")
            self._kept.extend(other._kept)
        return self

    def _require_samples(self, k: int) -> None:
        if self.n < k:
            raise ValueError(f"need at least {k} feature vectors, have {self.n}")

    @property
    def mean(self) -> np.ndarray:
        self._require_samples(1)
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        self._require_samples(2)
        return self._m2 / (self.n - 1)

    @property
    def features(self) -> np.ndarray:
        """All features seen so far, [n, D] float32; only when built with keep_features=True."""
        if not self.keep_features:
            raise ValueError("these statistics do not keep features: build FeatureStats(keep_features=True)")
        if not self._kept:
            return np.zeros((0, self.dim or 0), np.float32)
        return np.concatenate(self._kept)

    def fid(self, other: FeatureStats) -> float:
        """Frechet distance between the Gaussians fitted to two feature sets."""
        return frechet_distance(self.mean, self.cov, other.mean, other.cov)

    def save(self, path) -> None:
        """Write `mu`, `sigma` (clean-fid's npz keys), `n`, `meta` and kept features to an npz, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mean, "sigma": self.cov, "n": np.array(self.n), "meta": np.array(json.dumps(self.meta))}
        if self.keep_features:
            arrays["features"] = self.features
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path) -> FeatureStats:
        """Read statistics written by `save` (or a clean-fid stats npz with `mu` and `sigma`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no feature statistics at {path}: compute them first (stepdistill eval fid)")
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            # clean-fid's npz files do not record n; any n >= 2 reproduces their mu and sigma exactly.
            n = int(data["n"]) if "n" in data else 2
            stats = cls(dim=mu.shape[0], keep_features="features" in data)
            if "features" in data:
                stats._kept = [data["features"]]
            if "meta" in data:
                stats.meta = json.loads(str(data["meta"]))
        stats.n = n
        stats._mean = mu
        stats._m2 = sigma * (n - 1)
        return stats
