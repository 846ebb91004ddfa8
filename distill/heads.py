"""Per-teacher adaptor heads: MLPs from the student's width into each teacher's feature space.

    head = AdaptorHead(student_dim=384, summary_dim=512, dense_dim=768)
    pred = head(student_out.summary["clip"], student_out.dense)   # (summary [B,512], dense [B,768,h,w])

With `normalizer` (the mse loss), the dense MLP predicts the teacher's features *normalized* by a fixed
map (distill/feature_norm.py) that the head owns: `head.norm(target)` is the training target and
`head.to_teacher_space(pred)` maps a prediction back to the teacher's space.
"""

from __future__ import annotations

import torch
from torch import nn

from distill.feature_norm import build_normalizer


class MLP(nn.Module):
    """Token-wise MLP: (Linear -> LayerNorm -> GELU) x (num_layers - 1) -> Linear.

    Args:
        in_dim: input channels.
        hidden_dim: hidden width.
        out_dim: output channels.
        num_layers: number of Linear layers (at least 2).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2) -> None:
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"adaptor MLP needs num_layers >= 2, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AdaptorHead(nn.Module):
    """Summary MLP and dense MLP for one teacher.

    Args:
        student_dim: the student's token width.
        summary_dim: the teacher's summary width, or None if the teacher has no summary.
        dense_dim: the teacher's dense feature width.
        hidden_dim: hidden width of both MLPs.
        num_layers: Linear layers per MLP.
        normalizer: a feature_norm.NORMALIZERS name (the mse loss) or None: the fixed map of the dense targets.
    """

    def __init__(
        self,
        student_dim: int,
        summary_dim: int | None,
        dense_dim: int,
        hidden_dim: int = 1024,
        num_layers: int = 2,
        normalizer: str | None = None,
    ) -> None:
        super().__init__()
        self.summary = MLP(student_dim, hidden_dim, summary_dim, num_layers) if summary_dim else None
        self.dense = MLP(student_dim, hidden_dim, dense_dim, num_layers)
        self.norm = build_normalizer(normalizer, dense_dim) if normalizer else None
        self.config = dict(
            student_dim=student_dim, summary_dim=summary_dim, dense_dim=dense_dim, hidden_dim=hidden_dim, num_layers=num_layers
        )
        if normalizer:
            self.config["normalizer"] = normalizer

    def forward(
        self, summary: torch.Tensor | None, dense: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """summary [B, C_s] (or None) and dense [B, C_s, h, w] -> predictions in the teacher's space."""
        pred_summary = self.summary(summary) if self.summary is not None and summary is not None else None
        pred_dense = self.dense(dense.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return pred_summary, pred_dense

    def to_teacher_space(self, dense: torch.Tensor) -> torch.Tensor:
        """Undo the dense normalizer (identity without one) so predictions compare with raw teacher features."""
        return dense if self.norm is None else self.norm.inverse(dense)
