"""LightningModule for multi-teacher distillation (AM-RADIO style).

Wires frozen teachers, the student ViT and per-teacher adaptor heads; computes the summary and dense
losses per teacher, logs each of them, and reports per-teacher cosine similarity on validation.
Teacher weights are not stored in checkpoints (they are reloaded from their own files).
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from distill import losses
from distill.heads import AdaptorHead
from distill.schedule import warmup_cosine
from distill.student import StudentViT
from distill.teacher import Teacher

DENSE_LOSSES = ("cosine_smooth_l1", "mse")


class FeatureStats(nn.Module):
    """Running per-channel mean / std of a teacher's dense features (for the standardized MSE loss)."""

    def __init__(self, dim: int, momentum: float = 0.01) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, dense: torch.Tensor) -> None:
        flat = dense.float().transpose(0, 1).flatten(1)
        mean, std = flat.mean(1), flat.std(1)
        m = 1.0 if not self.initialized else self.momentum
        self.mean.lerp_(mean, m)
        self.std.lerp_(std, m)
        self.initialized.fill_(True)


class DistillModule(L.LightningModule):
    """Distill several frozen teachers into one student.

    Args:
        student: the student ViT; its ``summary_names`` must list the teachers that have a summary, in order.
        teachers: the frozen teachers with their loss weights.
        dense_loss: ``cosine_smooth_l1`` (a*cos + b*smooth-L1) or ``mse`` (MSE against teacher features
            standardized per channel with running statistics).
        dense_cosine_weight: a, the cosine part of ``cosine_smooth_l1``.
        dense_smooth_l1_weight: b, the smooth-L1 part of ``cosine_smooth_l1``.
        adaptor_hidden_dim: hidden width of every adaptor MLP.
        adaptor_layers: Linear layers per adaptor MLP (>= 2).
        optimizer: optimizer factory called with the parameter groups (AdamW by default).
        warmup_steps: linear LR warmup steps.
        min_lr_ratio: final LR as a fraction of the peak LR at the end of the cosine decay.
    """

    def __init__(
        self,
        student: StudentViT,
        teachers: list[Teacher],
        dense_loss: str = "cosine_smooth_l1",
        dense_cosine_weight: float = 0.9,
        dense_smooth_l1_weight: float = 0.1,
        adaptor_hidden_dim: int = 1024,
        adaptor_layers: int = 2,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.01,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["student", "teachers", "optimizer"])
        if dense_loss not in DENSE_LOSSES:
            raise ValueError(f"dense_loss must be one of {DENSE_LOSSES}, got {dense_loss!r}")
        names = [t.name for t in teachers]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"teachers need unique names and at least one teacher; got {names}")
        with_summary = [t.name for t in teachers if t.has_summary]
        if student.summary_names != with_summary:
            raise ValueError(
                f"student.summary_names is {student.summary_names} but the teachers with a summary are {with_summary}; "
                f"set model.student.init_args.summary_names: {with_summary}"
            )
        self.student = student
        self.teachers = nn.ModuleList(teachers)
        self.heads = nn.ModuleDict(
            {
                t.name: AdaptorHead(
                    student.embed_dim, t.encoder.summary_dim, t.encoder.dense_dim, adaptor_hidden_dim, adaptor_layers
                )
                for t in teachers
            }
        )
        self.stats = nn.ModuleDict({t.name: FeatureStats(t.encoder.dense_dim) for t in teachers})
        self.dense_loss = dense_loss
        self.optimizer_factory = optimizer

    def teacher_losses(self, images: torch.Tensor, stage: str) -> torch.Tensor:
        """Total weighted loss over teachers; logs every part per teacher (and cosines on validation)."""
        out = self.student(images)
        total = images.new_zeros(())
        for teacher in self.teachers:
            target = teacher.targets(images)
            pred_summary, pred_dense = self.heads[teacher.name](out.summary.get(teacher.name), out.dense)
            pred_dense = losses.resize_to_grid(pred_dense, target.dense.shape[-2:])
            logs = {}
            if teacher.has_summary:
                logs["summary_loss"] = losses.summary_cosine(pred_summary, target.summary)
                total = total + teacher.summary_weight * logs["summary_loss"]
            logs["dense_loss"] = self._dense_loss(teacher.name, pred_dense, target.dense, stage)
            total = total + teacher.dense_weight * logs["dense_loss"]
            if stage == "val":
                if teacher.has_summary:
                    logs["summary_cos"] = losses.cosine_similarity(pred_summary, target.summary, dim=-1).mean()
                logs["dense_cos"] = losses.cosine_similarity(self.to_teacher_space(teacher.name, pred_dense), target.dense).mean()
            for key, value in logs.items():
                self.log(f"{stage}/{teacher.name}/{key}", value, batch_size=len(images), sync_dist=stage == "val")
        self.log(f"{stage}/loss", total, prog_bar=True, batch_size=len(images), sync_dist=stage == "val")
        return total

    def _dense_loss(self, name: str, pred: torch.Tensor, target: torch.Tensor, stage: str) -> torch.Tensor:
        if self.dense_loss == "mse":
            if stage == "train":
                self.stats[name].update(target)
            return losses.dense_mse(pred, target, self.stats[name].mean, self.stats[name].std)
        return losses.dense_cosine_smooth_l1(
            pred, target, self.hparams.dense_cosine_weight, self.hparams.dense_smooth_l1_weight
        )

    def to_teacher_space(self, name: str, pred_dense: torch.Tensor) -> torch.Tensor:
        """Undo the standardization of the MSE loss so predictions compare with raw teacher features."""
        if self.dense_loss != "mse":
            return pred_dense
        stats = self.stats[name]
        return pred_dense * stats.std.view(1, -1, 1, 1) + stats.mean.view(1, -1, 1, 1)

    def training_step(self, images: torch.Tensor, batch_idx: int) -> torch.Tensor | None:
        if images.numel() == 0:
            return None  # every image of this batch was skipped as corrupt
        return self.teacher_losses(images, "train")

    def validation_step(self, images: torch.Tensor, batch_idx: int) -> None:
        if images.numel():
            self.teacher_losses(images, "val")

    def configure_optimizers(self):
        decay, no_decay = [], []
        for module in (self.student, self.heads):
            for param in module.parameters():
                if param.requires_grad:
                    (no_decay if param.ndim < 2 else decay).append(param)
        optimizer = self.optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = warmup_cosine(optimizer, self.hparams.warmup_steps, total, self.hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def export_metadata(self) -> dict:
        """Everything `distill export` needs to rebuild the student and heads without the teachers."""
        s = self.student
        return {
            "student": {
                "model_name": s.model_name,
                "model_args": s.model_args,
                "summary_names": s.summary_names,
                "num_registers": s.num_registers,
                "mean": s.mean.flatten().tolist(),
                "std": s.std.flatten().tolist(),
                "img_size": s.img_size,
            },
            "heads": {name: head.config for name, head in self.heads.items()},
            "dense_loss": self.dense_loss,
            "teachers": {
                t.name: {"summary_dim": t.encoder.summary_dim, "dense_dim": t.encoder.dense_dim,
                         "input_size": list(t.encoder.input_size)}
                for t in self.teachers
            },
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Teachers are frozen and reloaded from their own files: keep (possibly GBs of) their weights out.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teachers.")}
        checkpoint["unitower"] = self.export_metadata()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Put the current teacher weights back so strict loading still checks the student and heads.
        for key, value in self.teachers.state_dict().items():
            checkpoint["state_dict"].setdefault(f"teachers.{key}", value)
