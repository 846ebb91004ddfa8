"""Fixed normalization of a teacher's dense features, fitted once on calibration batches.

The `mse` dense loss compares the student's adaptor output with the teacher's features mapped by a
normalizer; the normalizer is fitted once before training (never updated afterwards), so every step,
every DDP rank and the export use the same map.

    norm = ChannelStandardizer(dim=768)
    sums = sum(norm.statistics(dense) for dense in calibration_batches)   # [B, C, h, w] each
    norm.fit(sums)              # on DDP, all-reduce `sums` first so every rank fits the same values
    target = norm(dense)        # (dense - mean) / std per channel
    teacher_space = norm.inverse(prediction)

A normalizer is defined by `statistics` (additive, so batches and ranks combine by summation), `fit`,
`forward` and `inverse`; NORMALIZERS maps a name (written into exports) to its class, so another
normalizer (e.g. PHI-S, which needs the channel covariance) can replace the per-channel one.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelStandardizer(nn.Module):
    """Per-channel mean / std standardization (buffers `mean`, `std`, `count` = feature vectors seen).

    Args:
        dim: the number of channels C of the dense features [B, C, h, w].
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @property
    def fitted(self) -> bool:
        return bool(self.count > 0)

    @torch.no_grad()
    def statistics(self, dense: torch.Tensor) -> torch.Tensor:
        """Additive sufficient statistics of one batch [B, C, h, w]: float64 [n, sum_c..., sum of squares_c...]."""
        if dense.ndim != 4 or dense.shape[1] != self.dim:
            raise ValueError(f"ChannelStandardizer(dim={self.dim}) expects dense features [B, {self.dim}, h, w]; got {tuple(dense.shape)}.")
        flat = dense.detach().double().transpose(0, 1).flatten(1)  # [C, B*h*w]
        count = flat.new_tensor([flat.shape[1]])
        return torch.cat([count, flat.sum(1), flat.square().sum(1)])

    @torch.no_grad()
    def fit(self, statistics: torch.Tensor) -> None:
        """Set mean / std (unbiased) from summed `statistics`; call once, with the same sums on every rank."""
        count, total, squares = statistics[0], statistics[1 : 1 + self.dim], statistics[1 + self.dim :]
        if count < 2:
            raise ValueError(f"ChannelStandardizer.fit needs at least 2 feature vectors, got {int(count)}.")
        mean = total / count
        var = (squares - count * mean.square()) / (count - 1)
        self.mean.copy_(mean)
        self.std.copy_(var.clamp_min(0).sqrt())
        self.count.copy_(count)

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        """(dense - mean) / std per channel, in float32."""
        return (dense.float() - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1).clamp_min(1e-6)

    def inverse(self, dense: torch.Tensor) -> torch.Tensor:
        """Map standardized features back to the teacher's space."""
        return dense * self.std.view(1, -1, 1, 1).clamp_min(1e-6) + self.mean.view(1, -1, 1, 1)


NORMALIZERS: dict[str, type[nn.Module]] = {"channel_standardizer": ChannelStandardizer}


def build_normalizer(kind: str, dim: int) -> nn.Module:
    """NORMALIZERS[kind](dim); kind as written in an export's adaptors.json."""
    if kind not in NORMALIZERS:
        raise ValueError(f"Unknown dense feature normalizer '{kind}'. Known: {sorted(NORMALIZERS)}.")
    return NORMALIZERS[kind](dim)
