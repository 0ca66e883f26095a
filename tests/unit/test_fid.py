"""Frechet distance, KID and streaming statistics against closed forms and clean-fid's own code."""

import numpy as np
import pytest
import torch

from stepdistill.metrics.fid import FeatureStats, frechet_distance, kernel_distance, trace_sqrt_product


def _random_cov(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d + 1e-3 * np.eye(d)


def test_frechet_distance_matches_closed_form_for_commuting_gaussians():
    # Diagonal covariances commute: d^2 = |mu1-mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_closed_form_in_one_dimension():
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + (2.0 - 3.0) ** 2)


def test_trace_sqrt_product_matches_scipy_sqrtm():
    from scipy import linalg

    rng = np.random.default_rng(1)
    s1, s2 = _random_cov(rng, 64), _random_cov(rng, 64)
    expected = np.trace(linalg.sqrtm(s1 @ s2)).real
    assert trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_a_set_with_itself_is_zero_even_when_rank_deficient():
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((20, 64))  # fewer samples than dimensions: singular covariance
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    # sqrt of round-off eigenvalues in the null space bounds the accuracy at ~sqrt(eps) per dimension.
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-5 * np.trace(sigma)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


CLEANFID_SCIPY_WARNING = "ignore:The `disp` argument is deprecated:DeprecationWarning"


@pytest.mark.filterwarnings(CLEANFID_SCIPY_WARNING)
def test_fid_equals_clean_fid_on_the_same_features():
    from cleanfid import fid as cleanfid

    rng = np.random.default_rng(3)
    f1 = rng.gamma(2.0, 0.5, (500, 32))  # non-negative like Inception pool3 features
    f2 = rng.gamma(2.2, 0.5, (400, 32)) + 0.1
    expected = cleanfid.fid_from_feats(f1, f2)
    ours = FeatureStats().update(f1).fid(FeatureStats().update(f2))
    assert ours == pytest.approx(expected, abs=1e-4)


def test_kid_equals_clean_fid_with_the_same_seed():
    from cleanfid import fid as cleanfid

    rng = np.random.default_rng(4)
    f1, f2 = rng.standard_normal((60, 8)), rng.standard_normal((50, 8)) + 0.5
    np.random.seed(7)
    expected = cleanfid.kernel_distance(f1, f2, num_subsets=10, max_subset_size=30)
    assert kernel_distance(f1, f2, num_subsets=10, max_subset_size=30, seed=7) == pytest.approx(expected, rel=1e-12)
    assert kernel_distance(f1, f2, num_subsets=10) > kernel_distance(f1, f1 + 1e-3, num_subsets=10)


def test_streaming_stats_equal_batch_stats_under_any_split_and_merge():
    rng = np.random.default_rng(5)
    feats = rng.standard_normal((301, 12)) * 3 + 100.0  # large offset: naive sums would lose digits
    whole = FeatureStats().update(feats)
    a = FeatureStats().update(feats[:7]).update(torch.from_numpy(feats[7:150]))
    b = FeatureStats().update(feats[150:151]).update(feats[151:])
    a.merge(b)
    for stats in (whole, a):
        assert stats.n == 301
        np.testing.assert_allclose(stats.mean, feats.mean(0), rtol=1e-12)
        np.testing.assert_allclose(stats.cov, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-9)


def test_stats_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    stats = FeatureStats(keep_features=True).update(rng.standard_normal((40, 5)))
    stats.meta = {"protocol": "folder", "n": 40}
    stats.save(tmp_path / "ref.npz")
    loaded = FeatureStats.load(tmp_path / "ref.npz")
    assert loaded.n == 40 and loaded.meta == stats.meta
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_allclose(loaded.cov, stats.cov, rtol=1e-15)
    np.testing.assert_array_equal(loaded.features, stats.features)
    # Loaded statistics keep merging correctly.
    extra = rng.standard_normal((10, 5))
    loaded.merge(FeatureStats(keep_features=True).update(extra))
    both = np.concatenate([stats.features.astype(np.float64), extra])
    np.testing.assert_allclose(loaded.cov, np.cov(both, rowvar=False), rtol=1e-6)


def test_stats_load_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="compute them first"):
        FeatureStats.load(tmp_path / "nope.npz")


# --- image-level FID through eval.fid, against clean-fid's compute_fid with the same small extractor ---------


class TinyExtractor(torch.nn.Module):
    """A fixed random conv net standing in for Inception: [B,3,299,299] in [0,255] -> [B,6]."""

    cache_id = "tiny-extractor-v1"

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 9, stride=8)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.05)
            self.conv.bias.zero_()

    def forward(self, x):
        return torch.relu(self.conv(x / 255)).mean((2, 3)) * 10


def _write_images(folder, n, seed, shift=0):
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        # Smooth non-square images (24x40) so the crop and the resizes both matter.
        base = rng.integers(0, 256, (3, 5, 3)).astype(np.float64) + shift
        img = np.kron(base, np.ones((8, 8, 1)))[:, :, :3]
        img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    _write_images(root / "gen", 24, seed=0)
    _write_images(root / "ref", 30, seed=1, shift=30)
    return root / "gen", root / "ref"


@pytest.mark.filterwarnings(CLEANFID_SCIPY_WARNING)
def test_compute_fid_equals_clean_fid_compute_fid(folders, tmp_path):
    from cleanfid import fid as cleanfid
    from stepdistill.eval.fid import compute_fid
    from stepdistill.eval.images import CropResize

    torch.set_num_threads(1)
    gen, ref = folders
    extractor = TinyExtractor().eval()
    expected = cleanfid.compute_fid(
        str(gen), str(ref), mode="clean", custom_feat_extractor=extractor, custom_image_tranform=CropResize(16),
        device=torch.device("cpu"), num_workers=0, use_dataparallel=False, verbose=False,
    )
    ours = compute_fid(gen, "folder", ref=ref, eval_res=16, extractor=extractor, cache_dir=tmp_path, num_workers=0,
                       device="cpu", write_metrics=False, progress=False)
    assert ours["fid"] == pytest.approx(expected, abs=1e-4)
    assert ours["fid"] > 1.0 and ours["kid"] > 0.0
    assert ours["n_gen"] == 24 and ours["n_ref"] == 30


def test_fid_of_a_folder_with_itself_is_zero_and_reference_stats_are_cached(folders, tmp_path):
    from stepdistill.eval.fid import compute_fid

    gen, _ = folders
    kwargs = {"protocol": "folder", "eval_res": 16, "extractor": TinyExtractor(), "cache_dir": tmp_path,
              "num_workers": 0, "device": "cpu", "write_metrics": False, "progress": False}
    first = compute_fid(gen, ref=gen, **kwargs)
    assert abs(first["fid"]) < 1e-6
    cached = list((tmp_path / "fid_stats").glob("*.npz"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    assert compute_fid(gen, ref=gen, **kwargs)["fid"] == pytest.approx(first["fid"], abs=1e-9)
    assert cached[0].stat().st_mtime_ns == mtime  # reused, not recomputed


def test_custom_protocol_reuses_named_reference_stats_without_the_folder(folders, tmp_path):
    from stepdistill.eval.fid import compute_fid

    gen, ref = folders
    kwargs = {"protocol": "custom", "eval_res": 16, "extractor": TinyExtractor(), "cache_dir": tmp_path,
              "num_workers": 0, "device": "cpu", "write_metrics": False, "progress": False}
    with_folder = compute_fid(gen, ref=ref, ref_name="myref", **kwargs)
    by_name = compute_fid(gen, ref=None, ref_name="myref", **kwargs)
    assert by_name["fid"] == pytest.approx(with_folder["fid"], abs=1e-9)
    assert (tmp_path / "fid_stats" / "custom" / "myref.npz").is_file()


def test_presets_fix_their_resolution():
    from stepdistill.eval.fid import PROTOCOLS, resolve_protocol

    assert PROTOCOLS["coco2014-30k-256"].eval_res == 256 and PROTOCOLS["coco2014-30k-256"].n_gen == 30_000
    assert PROTOCOLS["coco2014-10k-512"].eval_res == 512 and PROTOCOLS["coco2014-10k-512"].patch
    with pytest.raises(ValueError, match="folder"):
        resolve_protocol("coco2014-30k-256", eval_res=512)
    with pytest.raises(ValueError, match="choose one of"):
        resolve_protocol("coco")


def test_missing_inception_weights_say_which_file_to_place_where(tmp_path, monkeypatch):
    import tempfile

    from stepdistill.eval.fid import INCEPTION_FILE, INCEPTION_URL, load_inception

    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("STEPDISTILL_INCEPTION", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        load_inception()
    assert INCEPTION_URL in str(err.value) and str(tmp_path / "cache" / INCEPTION_FILE) in str(err.value)
    with pytest.raises(FileNotFoundError, match=INCEPTION_FILE):
        load_inception(tmp_path / "elsewhere.pt")
    truncated = tmp_path / INCEPTION_FILE
    truncated.write_bytes(b"PK\x03\x04 not a whole file")
    with pytest.raises(RuntimeError, match="truncated download"):
        load_inception(truncated)


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")  # the real weights only exist as TorchScript
def test_inception_loader_reads_a_torchscript_file_and_normalises_like_clean_fid(tmp_path):
    from stepdistill.eval.fid import INCEPTION_FILE, load_inception

    class Layers(torch.nn.Module):
        def forward(self, x):
            return x.mean((1, 2, 3)).view(-1, 1, 1, 1).expand(-1, 2048, 1, 1)

    class FakeInception(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x):
            return self.layers(x)

    torch.jit.save(torch.jit.script(FakeInception()), str(tmp_path / INCEPTION_FILE))
    net = load_inception(tmp_path, "cpu")  # a folder holding the file works like the file itself
    feats = net(torch.full((2, 3, 299, 299), 192.0))
    assert feats.shape == (2, 2048)
    torch.testing.assert_close(feats, torch.full((2, 2048), 0.5))  # (192 - 128) / 128
    assert net.cache_id.startswith("inception-2015-12-05:")
    with pytest.raises(ValueError, match="299x299"):
        net(torch.zeros(1, 3, 256, 256))
