"""Fixed per-channel token statistics, measured once on calibration images and kept as buffers (so they travel
in checkpoints): the tower `norm` rules "standardize" and "whiten" (mllm/towers.py).

    stats = TokenStats(channels=768, whiten=True)
    stats.fit(features)          # features [..., 768] of the calibration images (every token a sample), or their
                                 # Moments added batch by batch (what VisionTower.calibrate does)
    tokens = stats(features)     # (x - mean) / std, then @ ZCA matrix when `whiten`

standardize: every channel z-scored with the calibration tokens' mean and std (std floored at 1e-6).
whiten: after standardizing, the channels are decorrelated with the symmetric ZCA matrix
W = U diag(1 / sqrt(s + floor)) U^T of the standardized tokens' covariance (eigenvalues s, floor = WHITEN_FLOOR
x their mean): identity covariance on the calibration set, near-empty directions not blown up. The math (float64
moments, floor 0.01) is the old cached path's. The toy study uses "standardize" (its oracle: 0.910 / 0.889 on
seeds 0 / 1, against 0.389 / 0.732 whitened; README).
"""

from __future__ import annotations

import torch
from torch import nn

WHITEN_FLOOR = 0.01  # ZCA eigenvalue floor, relative to their mean: near-empty directions are not blown up
STD_FLOOR = 1e-6


def zca_matrix(covariance: torch.Tensor) -> torch.Tensor:
    """The symmetric whitening matrix [C, C] of a covariance [C, C]: x @ W has (close to) identity covariance."""
    eigenvalues, vectors = torch.linalg.eigh(covariance)
    floor = WHITEN_FLOOR * eigenvalues.clamp_min(0).mean() + 1e-12
    return vectors @ torch.diag((eigenvalues.clamp_min(0) + floor).rsqrt()) @ vectors.T


class Moments:
    """Running count, sum and sum of outer products (float64) of tokens [..., C], added batch by batch, so the
    calibration set never has to sit in memory at once."""

    def __init__(self, channels: int) -> None:
        self.channels, self.count = channels, 0
        self.total: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def add(self, features: torch.Tensor) -> "Moments":
        tokens = features.reshape(-1, features.shape[-1]).double()
        if self.total is None:
            self.total = tokens.new_zeros(self.channels)
            self.outer = tokens.new_zeros(self.channels, self.channels)
        self.count += len(tokens)
        self.total += tokens.sum(0)
        self.outer += tokens.T @ tokens
        return self

    def mean_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [C] and unbiased covariance [C, C] of every token added."""
        if self.count < 2:
            raise ValueError(f"token statistics need at least 2 tokens, got {self.count}; give more calibration images.")
        mean = self.total / self.count
        return mean, (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)


class TokenStats(nn.Module):
    """Per-channel statistics of one encoder part (one layer) and their application.

    Args:
        channels: C, the width of the features.
        whiten: also hold and apply the ZCA matrix [C, C]; False = standardize only.
        name: what the statistics belong to (e.g. "EnsembleTower part 1 layer 0"), named in errors.
    """

    def __init__(self, channels: int, whiten: bool, name: str = "tower") -> None:
        super().__init__()
        self.channels, self.whiten, self.name = channels, whiten, name
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))
        if whiten:
            self.register_buffer("matrix", torch.eye(channels))
        self.register_buffer("calibrated", torch.tensor(False))

    @torch.no_grad()
    def fit(self, features: torch.Tensor | Moments) -> None:
        """Measure mean, std (and the ZCA matrix) from features [..., C] (every token one sample, in float64), or
        from their Moments accumulated batch by batch."""
        moments = features if isinstance(features, Moments) else Moments(features.shape[-1]).add(features)
        if moments.channels != self.channels:
            raise ValueError(f"{self.name}: calibration features have {moments.channels} channels, expected "
                             f"{self.channels}.")
        mean, covariance = moments.mean_covariance()
        std = covariance.diagonal().clamp_min(0).sqrt().clamp_min(STD_FLOOR)
        self.mean.copy_(mean)
        self.std.copy_(std)
        if self.whiten:  # the covariance of the standardized tokens
            self.matrix.copy_(zca_matrix(covariance / torch.outer(std, std)))
        self.calibrated.fill_(True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not bool(self.calibrated):
            raise RuntimeError(f"{self.name}: its standardize/whiten statistics were never measured. LlavaModule "
                               "measures them at the start of the first stage (norm_calibration_images); call "
                               "tower.calibrate(features) yourself, or load a checkpoint that holds them "
                               "(init_from / ckpt_path).")
        standardized = (features - self.mean) / self.std
        return standardized @ self.matrix if self.whiten else standardized
