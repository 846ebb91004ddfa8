"""Fixed per-channel token statistics (mllm/token_stats.py): standardize / ZCA-whiten against a NumPy computation,
identity covariance and zero mean / unit std on the calibration set, batch-by-batch moments equal to one pass,
a checkpoint round trip of the buffers, and the clear error of an uncalibrated forward (tests/test_token_stats.py)."""

import numpy as np
import pytest
import torch

from mllm.token_stats import WHITEN_FLOOR, Moments, TokenStats


def correlated(count=4000, channels=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(channels, channels, generator=generator)
    scale = torch.tensor([10.0, 0.1, 1.0, 3.0, 0.5, 2.0])[:channels]
    return (torch.randn(count, 2, channels, generator=generator) @ mixing) * scale + 5.0


def numpy_whitening(x: np.ndarray) -> np.ndarray:
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    z = (x - x.mean(0)) / x.std(0, ddof=1)
    eigenvalues, vectors = np.linalg.eigh(np.cov(z, rowvar=False))
    floor = WHITEN_FLOOR * eigenvalues.mean() + 1e-12
    return vectors @ np.diag(1 / np.sqrt(eigenvalues + floor)) @ vectors.T


def test_standardize_gives_zero_mean_unit_std_on_the_calibration_set():
    x = correlated()
    stats = TokenStats(6, whiten=False)
    stats.fit(x)
    out = stats(x).reshape(-1, 6).double()
    assert torch.allclose(out.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(out.std(0), torch.ones(6, dtype=torch.float64), atol=1e-4)
    assert not hasattr(stats, "matrix")


def test_whiten_matches_numpy_and_decorrelates_the_calibration_set():
    x = correlated()
    stats = TokenStats(6, whiten=True)
    stats.fit(x)
    assert np.allclose(stats.matrix.numpy(), numpy_whitening(x.numpy()), atol=1e-5)
    out = stats(x).reshape(-1, 6).double()
    assert torch.allclose(out.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-4)
    # identity covariance up to the eigenvalue floor (1% of the mean eigenvalue): s / (s + floor) per eigenvector
    z = (x.reshape(-1, 6).double() - x.reshape(-1, 6).double().mean(0)) / x.reshape(-1, 6).double().std(0)
    eigenvalues, vectors = torch.linalg.eigh(torch.cov(z.T))
    shrunk = eigenvalues / (eigenvalues + WHITEN_FLOOR * eigenvalues.mean() + 1e-12)
    assert torch.allclose(torch.cov(out.T), vectors @ torch.diag(shrunk) @ vectors.T, atol=1e-4)


def test_moments_added_batch_by_batch_equal_one_pass():
    x = correlated()
    moments = Moments(6)
    for chunk in x.split(333):
        moments.add(chunk)
    whole, batched = TokenStats(6, whiten=True), TokenStats(6, whiten=True)
    whole.fit(x)
    batched.fit(moments)
    for name in ("mean", "std", "matrix"):
        assert torch.allclose(getattr(whole, name), getattr(batched, name), atol=1e-5)


def test_statistics_survive_a_state_dict_round_trip(tmp_path):
    stats = TokenStats(6, whiten=True)
    stats.fit(correlated())
    torch.save(stats.state_dict(), tmp_path / "stats.pt")
    fresh = TokenStats(6, whiten=True)
    fresh.load_state_dict(torch.load(tmp_path / "stats.pt", weights_only=True))
    assert bool(fresh.calibrated)
    x = correlated(count=10, seed=1)
    assert torch.equal(fresh(x), stats(x))


def test_an_uncalibrated_forward_says_what_to_do():
    stats = TokenStats(6, whiten=True, name="EnsembleTower(norm='whiten') part 0 layer 0")
    with pytest.raises(RuntimeError, match=r"EnsembleTower\(norm='whiten'\) part 0 layer 0.*never measured.*calibrate"):
        stats(torch.zeros(1, 6))
    with pytest.raises(ValueError, match="5 channels, expected 6"):
        stats.fit(torch.zeros(10, 5))
