"""Compression of one teacher's dense features: PCA basis + low-bit coefficients with per-token fp16 scales.

A codec is fitted once per teacher on calibration tokens ([N, C] rows of the dense map):

    codec = PcaCodec.fit_within(tokens, bytes_per_token=24)   # the best layout within a byte budget
    q, s = codec.encode(tokens)            # codes [N, code_bytes], fp16 scales [N] (or [N, 2])
    back = codec.decode(q, s)              # float32 [N, C]

Encoding: the k PCA coefficients c = (x - mean) @ basis are divided by std ** alpha (std: each component's
calibration std; alpha = 1 whitens, 0.5 half-whitens), then quantized per token with scale = max|c'| / L
over a group of components (L = 127 for 8 bits, 7 for 4 bits; two 4-bit codes per byte). Layouts:
``bits=8`` (one int8 group), ``bits=4`` (one 4-bit group), ``bits=4, head=h`` (the first h components
int8 with their own scale, the rest 4-bit: the leading components carry most of the energy and get the finer
steps). `fit_within` tries these at the largest component count a byte budget allows, with alpha 0.5 and 1,
and keeps the best calibration cosine. Measured on random-init open_clip ViT-B/16 features at 1/5 of
Theia's bytes: mean token cosine 0.983 with the two plain layouts, 0.993 with a 16-component int8 head and
alpha 0.5 (scripts/bench_distill.py prints the chosen layout). Stored as safetensors (mean, basis, std,
bits, alpha, head).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from distill.common.io import save_safetensors

HEADS = (2, 4, 8, 16, 32, 64)  # int8 head sizes `fit_within` tries
ALPHAS = (0.5, 1.0)


def token_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of matching rows of two [N, C] tensors."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)


def pca(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean [C], eigenvectors [C, C] by decreasing variance, their std [C]) of [N, C] rows (float64 inside)."""
    tokens = tokens.double()
    mean = tokens.mean(0)
    centred = tokens - mean
    values, vectors = torch.linalg.eigh(centred.T @ centred / max(len(tokens) - 1, 1))
    order = values.argsort(descending=True)
    return mean.float(), vectors[:, order].float(), values[order].clamp_min(0).sqrt().float()


class PcaCodec:
    """Low-rank low-bit codec of [N, C] feature rows (see the module docstring)."""

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, std: torch.Tensor, bits: int = 8,
                 alpha: float = 1.0, head: int = 0) -> None:
        if bits not in (4, 8):
            raise ValueError(f"PcaCodec: bits must be 4 or 8, got {bits}")
        if basis.ndim != 2 or basis.shape[0] != mean.shape[0] or std.shape != (basis.shape[1],):
            raise ValueError(f"PcaCodec: mean {tuple(mean.shape)}, basis {tuple(basis.shape)}, std {tuple(std.shape)} "
                             "do not fit together (expected [C], [C, k], [k]).")
        if head and (bits != 4 or not 0 < head < basis.shape[1]):
            raise ValueError(f"PcaCodec: an int8 head ({head}) needs bits=4 and fewer than the {basis.shape[1]} components.")
        if bits == 4 and (basis.shape[1] - head) % 2:
            raise ValueError(f"PcaCodec: 4-bit codes need an even number of components after the head, got "
                             f"{basis.shape[1] - head}")
        self.bits, self.alpha, self.head = bits, float(alpha), int(head)
        # components without variance would only scale noise up: floor the std at 1e-3 of the largest one
        self.mean, self.basis = mean.float(), basis.float()
        self.std = std.float().clamp_min(float(std.max()) * 1e-3 + 1e-12)

    @property
    def channels(self) -> int:
        return self.basis.shape[0]

    @property
    def components(self) -> int:
        return self.basis.shape[1]

    @property
    def groups(self) -> list[tuple[int, int, int]]:
        """(start, stop, levels) of each separately scaled group of components."""
        k = self.components
        if self.bits == 8:
            return [(0, k, 127)]
        return ([(0, self.head, 127)] if self.head else []) + [(self.head, k, 7)]

    @property
    def code_bytes(self) -> int:
        """Bytes of codes per token (scales not included)."""
        return self.components if self.bits == 8 else self.head + (self.components - self.head) // 2

    def bytes_per_token(self) -> int:
        return self.code_bytes + 2 * len(self.groups)  # codes + one fp16 scale per group

    @staticmethod
    def _largest(channels: int, per_token: int, bits: int, head: int) -> int:
        """The most components a layout fits in `per_token` bytes (0 if none)."""
        if bits == 8:
            return max(0, min(channels, per_token - 2))
        tail = min(channels - head, 2 * (per_token - 2 - (head + 2 if head else 0)))
        tail -= tail % 2
        return head + tail if tail >= 2 else 0

    @classmethod
    def fit(cls, tokens: torch.Tensor, min_cosine: float = 0.99, max_components: int | None = None,
            components: int | None = None) -> "PcaCodec":
        """An int8 codec fitted on [N, C] calibration rows; `components` fixes k, else the smallest k meeting
        `min_cosine` at the 1st percentile of calibration tokens."""
        mean, vectors, std = pca(tokens)
        channels = tokens.shape[1]
        limit = min(channels, max_components or channels)
        if components is not None:
            ladder = [min(components, channels)]
        else:
            ladder = sorted({k for k in (2 ** i for i in range(1, 16)) if k < limit} | {limit})
        codec = None
        for k in ladder:
            codec = cls(mean, vectors[:, :k], std[:k])
            if components is not None:
                break
            cos = token_cosines(codec.decode(*codec.encode(tokens.float())), tokens)
            if torch.quantile(cos, 0.01) >= min_cosine:
                break
        return codec

    @classmethod
    def fit_within(cls, tokens: torch.Tensor, bytes_per_token: int,
                   fitted: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> "PcaCodec":
        """The codec of at most `bytes_per_token` with the best calibration mean cosine among the layouts
        int8, 4-bit, and int8 head (HEADS) + 4-bit, each at alpha 0.5 and 1 (see the module docstring).
        `fitted`: `pca(tokens)` when the caller already has it (budget searches fit many budgets)."""
        mean, vectors, std = fitted if fitted is not None else pca(tokens)
        channels, best, best_cos = tokens.shape[1], None, -2.0
        layouts = [(8, 0), (4, 0)] + [(4, h) for h in HEADS if h < channels]
        for bits, head in layouts:
            k = cls._largest(channels, bytes_per_token, bits, head)
            if k < 2 or (head and k <= head):
                continue
            for alpha in ALPHAS:
                codec = cls(mean, vectors[:, :k], std[:k], bits, alpha, head)
                cos = float(token_cosines(codec.decode(*codec.encode(tokens)), tokens).mean())
                if cos > best_cos:
                    best, best_cos = codec, cos
        if best is None:
            raise ValueError(f"PcaCodec.fit_within: {bytes_per_token} bytes per token leave no room for coefficients.")
        return best

    @property
    def levels(self) -> int:
        """Quantization levels of the (last) group: 127 for int8 codes, 7 for 4-bit ones."""
        return self.groups[-1][2]

    def coefficients(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, C] -> the scaled PCA coefficients [N, k] that are quantized."""
        return (tokens.float() - self.mean) @ self.basis / self.std ** self.alpha

    def encode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, C] -> (codes: int8 [N, k] for bits 8, uint8 [N, code_bytes] otherwise; fp16 scales [N], or
        [N, 2] with an int8 head)."""
        coeffs = self.coefficients(tokens)
        codes, scales = [], []
        for start, stop, levels in self.groups:
            part = coeffs[:, start:stop]
            scale = (part.abs().amax(dim=1) / levels).clamp_min(1e-8).half()
            q = torch.round(part / scale.float()[:, None]).clamp(-levels, levels)
            if levels == 127:
                q = q.to(torch.int8)
                codes.append(q if self.bits == 8 else q.view(torch.uint8))
            else:
                nibbles = (q + 8).to(torch.uint8)
                codes.append(nibbles[:, 0::2] | (nibbles[:, 1::2] << 4))
            scales.append(scale)
        return torch.cat(codes, dim=1), (scales[0] if len(scales) == 1 else torch.stack(scales, dim=1))

    def unpack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes as stored -> float [N, k] quantization levels."""
        if self.bits == 8:
            return codes.view(torch.int8).float()
        head = codes[:, :self.head].view(torch.int8).float()
        tail = codes[:, self.head:]
        low, high = (tail & 15).float() - 8, (tail >> 4).float() - 8
        return torch.cat([head, torch.stack([low, high], dim=2).reshape(codes.shape[0], -1)], dim=1)

    def decode(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """(codes, fp16 scales [N] or [N, groups]) -> float32 [N, C]."""
        levels = self.unpack(q)
        scale = scale.float().reshape(len(levels), -1)
        per_component = torch.cat([scale[:, g:g + 1].expand(-1, stop - start)
                                   for g, (start, stop, _) in enumerate(self.groups)], dim=1)
        return (levels * per_component * self.std ** self.alpha) @ self.basis.T + self.mean

    def save(self, path: str | Path) -> Path:
        return save_safetensors({"mean": self.mean.contiguous(), "basis": self.basis.contiguous(),
                                 "std": self.std.contiguous(), "bits": torch.tensor(self.bits),
                                 "alpha": torch.tensor(self.alpha), "head": torch.tensor(self.head)}, path)

    @classmethod
    def load(cls, path: str | Path) -> "PcaCodec":
        """A saved codec; files from before alpha / head (whitened, no head) load as such."""
        t = load_file(str(path))
        return cls(t["mean"], t["basis"], t["std"], int(t["bits"]) if "bits" in t else 8,
                   float(t["alpha"]) if "alpha" in t else 1.0, int(t["head"]) if "head" in t else 0)
