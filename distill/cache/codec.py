"""Compression of one teacher's dense features: PCA basis + int8 or int4 coefficients with a per-token fp16 scale.

A codec is fitted once per teacher on calibration tokens ([N, C] rows of the dense map):

    codec = PcaCodec.fit(tokens, min_cosine=0.99, max_components=k_budget)
    q, s = codec.encode(tokens)            # int8 [N, k], fp16 [N]
    back = codec.decode(q, s)              # float32 [N, C]

Encoding: coefficients c = (x - mean) @ basis are divided by each component's calibration std (so every
component uses the int8 range alike), then quantized per token with scale = max|c'| / L (L = 127 for 8 bits, 7 for 4 bits;
two 4-bit codes per byte). `fit_within` tries both widths at the largest component count a byte budget
allows and keeps the one with the better calibration cosine (4 bits pays when the spectrum is flat:
twice the components for the same bytes). Stored as safetensors (mean, basis, std, bits).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from distill.io import save_safetensors


def token_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of matching rows of two [N, C] tensors."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)


class PcaCodec:
    """Low-rank int8 codec of [N, C] feature rows (see the module docstring)."""

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, std: torch.Tensor, bits: int = 8) -> None:
        if bits not in (4, 8):
            raise ValueError(f"PcaCodec: bits must be 4 or 8, got {bits}")
        if bits == 4 and basis.shape[1] % 2:
            raise ValueError(f"PcaCodec: 4-bit codes need an even number of components, got {basis.shape[1]}")
        self.bits = bits
        if basis.ndim != 2 or basis.shape[0] != mean.shape[0] or std.shape != (basis.shape[1],):
            raise ValueError(f"PcaCodec: mean {tuple(mean.shape)}, basis {tuple(basis.shape)}, std {tuple(std.shape)} "
                             "do not fit together (expected [C], [C, k], [k]).")
        # components without variance would only scale noise up: floor the std at 1e-3 of the largest one
        self.mean, self.basis = mean.float(), basis.float()
        self.std = std.float().clamp_min(float(std.max()) * 1e-3 + 1e-12)

    @property
    def channels(self) -> int:
        return self.basis.shape[0]

    @property
    def components(self) -> int:
        return self.basis.shape[1]

    def bytes_per_token(self) -> int:
        return self.components * self.bits // 8 + 2  # packed coefficients + fp16 scale

    @classmethod
    def fit(cls, tokens: torch.Tensor, min_cosine: float = 0.99, max_components: int | None = None,
            components: int | None = None) -> "PcaCodec":
        """Fit on [N, C] calibration rows; `components` fixes k, else the smallest k meeting `min_cosine`."""
        tokens = tokens.double()
        channels = tokens.shape[1]
        mean = tokens.mean(0)
        centred = tokens - mean
        values, vectors = torch.linalg.eigh(centred.T @ centred / max(len(tokens) - 1, 1))
        order = values.argsort(descending=True)
        values, vectors = values[order].clamp_min(0), vectors[:, order]
        limit = min(channels, max_components or channels)
        if components is not None:
            ladder = [min(components, channels)]
        else:
            ladder = sorted({k for k in (2 ** i for i in range(1, 16)) if k < limit} | {limit})
        codec = None
        for k in ladder:
            codec = cls(mean.float(), vectors[:, :k].float(), values[:k].sqrt().float())
            if components is not None:
                break
            cos = token_cosines(codec.decode(*codec.encode(tokens.float())), tokens)
            if torch.quantile(cos, 0.01) >= min_cosine:
                break
        return codec

    @classmethod
    def fit_within(cls, tokens: torch.Tensor, bytes_per_token: int) -> "PcaCodec":
        """The better (calibration mean cosine) of an 8-bit and a 4-bit codec of at most `bytes_per_token`."""
        channels, best, best_cos = tokens.shape[1], None, -2.0
        for bits in (8, 4):
            k = min(channels - channels % (8 // bits) if bits == 4 else channels, (bytes_per_token - 2) * 8 // bits)
            k -= k % 2 if bits == 4 else 0
            if k < 2:
                continue
            codec = cls.fit(tokens, components=k)
            codec = cls(codec.mean, codec.basis, codec.std, bits)
            cos = float(token_cosines(codec.decode(*codec.encode(tokens)), tokens).mean())
            if cos > best_cos:
                best, best_cos = codec, cos
        if best is None:
            raise ValueError(f"PcaCodec.fit_within: {bytes_per_token} bytes per token leave no room for coefficients.")
        return best

    @property
    def levels(self) -> int:
        return 127 if self.bits == 8 else 7

    def encode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, C] -> (codes [N, k] int8, or uint8 [N, k/2] for 4 bits; fp16 scale [N])."""
        coeffs = (tokens.float() - self.mean) @ self.basis / self.std
        scale = (coeffs.abs().amax(dim=1) / self.levels).clamp_min(1e-8).half()
        q = torch.round(coeffs / scale.float()[:, None]).clamp(-self.levels, self.levels)
        if self.bits == 8:
            return q.to(torch.int8), scale
        nibbles = (q + 8).to(torch.uint8)
        return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scale

    def unpack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes as stored -> float [N, k] quantization levels."""
        if self.bits == 8:
            return codes.float()
        low, high = (codes & 15).float() - 8, (codes >> 4).float() - 8
        return torch.stack([low, high], dim=2).reshape(codes.shape[0], -1)

    def decode(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """(codes, fp16 scale [N]) -> float32 [N, C]."""
        coeffs = self.unpack(q) * scale.float()[:, None] * self.std
        return coeffs @ self.basis.T + self.mean

    def save(self, path: str | Path) -> Path:
        return save_safetensors({"mean": self.mean.contiguous(), "basis": self.basis.contiguous(),
                                 "std": self.std.contiguous(), "bits": torch.tensor(self.bits)}, path)

    @classmethod
    def load(cls, path: str | Path) -> "PcaCodec":
        t = load_file(str(path))
        return cls(t["mean"], t["basis"], t["std"], int(t["bits"]) if "bits" in t else 8)
