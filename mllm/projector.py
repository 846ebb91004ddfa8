"""Projectors from vision-tower tokens [B, N, C_vision] to LM embeddings [B, N, C_lm].

    projector = build_projector("mlp2x_gelu", in_dim=1024, out_dim=4096)   # LLaVA-1.5's projector

Kinds: "linear" (LLaVA-1), "mlpNx_gelu" (N linear layers with GELU between; LLaVA-1.5 uses N=2).
"""

from __future__ import annotations

import re

from torch import nn

_MLP_PATTERN = re.compile(r"^mlp(\d+)x_gelu$")


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """Return the projector named `kind` mapping in_dim -> out_dim channels."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    match = _MLP_PATTERN.match(kind)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"projector '{kind}' is unknown; use 'linear' or 'mlpNx_gelu' with N >= 1 (e.g. 'mlp2x_gelu')")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)
