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
normalizer replaces the per-channel one: `phi_s` (PhiS, RADIOv2.5's PCA-Hadamard isotropic standardization, from
the channel covariance) is the other choice (DistillModule's `dense_normalizer`).
"""

from __future__ import annotations

import torch
from torch import nn


class FixedNormalizer(nn.Module):
    """Base of the fixed dense-feature maps: `count` (feature vectors seen at calibration; 0 = not fitted) and the
    input check shared by every `statistics`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @property
    def fitted(self) -> bool:
        return bool(self.count > 0)

    def _channels_by_vectors(self, dense: torch.Tensor) -> torch.Tensor:
        """Dense features [B, C, h, w] -> float64 [C, B*h*w], or an error naming the expected shape."""
        if dense.ndim != 4 or dense.shape[1] != self.dim:
            raise ValueError(
                f"{type(self).__name__}(dim={self.dim}) expects dense features [B, {self.dim}, h, w]; got {tuple(dense.shape)}."
            )
        return dense.detach().double().transpose(0, 1).flatten(1)


class ChannelStandardizer(FixedNormalizer):
    """Per-channel mean / std standardization (buffers `mean`, `std`, `count` = feature vectors seen).

    Args:
        dim: the number of channels C of the dense features [B, C, h, w].
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def statistics(self, dense: torch.Tensor) -> torch.Tensor:
        """Additive sufficient statistics of one batch [B, C, h, w]: float64 [n, sum_c..., sum of squares_c...]."""
        flat = self._channels_by_vectors(dense)
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


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix H (entries +-1, H @ H.T = n I) of order n = 2^k * m, m in {1, 2} or m = q + 1 with q
    a prime = 3 (mod 4) (Sylvester's doubling of Paley's first construction); covers every width of the CLIP,
    DINOv2, SAM and SigLIP families (64, 96, 256, 384, 512, 768, 1024, 1152, 1280, 1536, ...)."""
    k, m = 0, n
    while m % 2 == 0 and m > 2:
        m, k = m // 2, k + 1
    while True:  # m must be 1, 2 or q + 1; move factors of 2 back into m until Paley applies
        if m in (1, 2) or (_is_prime(m - 1) and (m - 1) % 4 == 3):
            break
        if k == 0:
            raise ValueError(
                f"PHI-S needs a Hadamard matrix of order {n} (the teacher's dense width); this construction has none. "
                "Use dense_normalizer: channel_standardizer for this teacher."
            )
        m, k = m * 2, k - 1
    base = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m - 1) if m > 2 else _SYLVESTER_2
    for _ in range(k):
        base = torch.kron(_SYLVESTER_2, base)
    return base


_SYLVESTER_2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley construction I: order q + 1 for a prime q = 3 (mod 4), from the quadratic residues mod q."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]  # Q[i, j] = chi(j - i), antisymmetric for q = 3 mod 4
    skew = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    skew[0, 1:], skew[1:, 0], skew[1:, 1:] = 1.0, -1.0, jacobsthal
    return skew + torch.eye(q + 1, dtype=torch.float64)


class PhiS(FixedNormalizer):
    """PHI-S (Ranzinger et al. 2024, RADIOv2.5): PCA-Hadamard isotropic standardization of a teacher's features.

    With mean mu and covariance U diag(lambda) U^T of the calibration features, y = H U^T (x - mu) / alpha,
    H the orthonormal Hadamard matrix of order C and alpha = sqrt(mean(lambda)): every output channel has
    variance exactly 1 (diag(H diag(lambda) H^T) = mean(lambda)) and the map is a rotation plus one scale, so
    it is invertible (x = alpha U H^T y + mu) and keeps the teacher's relative channel scales. Buffers: `mean`,
    `transform` (H U^T / alpha), `inverse_transform` (alpha U H^T), `count`.

    Args:
        dim: the number of channels C of the dense features [B, C, h, w] (needs a Hadamard matrix, see `hadamard`).
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.hadamard = hadamard(dim) / dim**0.5  # fail at construction, not after calibration
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("transform", torch.eye(dim))
        self.register_buffer("inverse_transform", torch.eye(dim))

    @torch.no_grad()
    def statistics(self, dense: torch.Tensor) -> torch.Tensor:
        """Additive statistics of one batch [B, C, h, w]: float64 [n, sum_c..., sum of outer products (C*C)...]."""
        flat = self._channels_by_vectors(dense)  # [C, N]
        return torch.cat([flat.new_tensor([flat.shape[1]]), flat.sum(1), (flat @ flat.T).flatten()])

    @torch.no_grad()
    def fit(self, statistics: torch.Tensor) -> None:
        """Fix mean, rotation and scale from summed `statistics` (same sums on every rank)."""
        count, total = statistics[0], statistics[1 : 1 + self.dim]
        if count < 2:
            raise ValueError(f"PhiS.fit needs at least 2 feature vectors, got {int(count)}.")
        mean = total / count
        outer = statistics[1 + self.dim :].view(self.dim, self.dim)
        cov = (outer - count * torch.outer(mean, mean)) / (count - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh((cov + cov.T) / 2)
        alpha = eigenvalues.clamp_min(0).mean().sqrt().clamp_min(1e-6)
        rotation = self.hadamard.to(eigenvectors) @ eigenvectors.T
        self.mean.copy_(mean)
        self.transform.copy_(rotation / alpha)
        self.inverse_transform.copy_(rotation.T * alpha)
        self.count.copy_(count)

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        """y = transform (dense - mean) per position, in float32."""
        centered = dense.float() - self.mean.view(1, -1, 1, 1)
        return torch.einsum("oc,bchw->bohw", self.transform, centered)

    def inverse(self, dense: torch.Tensor) -> torch.Tensor:
        """Map PHI-S features back to the teacher's space."""
        return torch.einsum("co,bohw->bchw", self.inverse_transform, dense) + self.mean.view(1, -1, 1, 1)


NORMALIZERS: dict[str, type[nn.Module]] = {"channel_standardizer": ChannelStandardizer, "phi_s": PhiS}


def build_normalizer(kind: str, dim: int) -> nn.Module:
    """NORMALIZERS[kind](dim); kind as written in an export's adaptors.json."""
    if kind not in NORMALIZERS:
        raise ValueError(f"Unknown dense feature normalizer '{kind}'. Known: {sorted(NORMALIZERS)}.")
    return NORMALIZERS[kind](dim)
