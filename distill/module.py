"""LightningModule for multi-teacher distillation (AM-RADIO style).

Wires frozen teachers to the student (distill/model.py StudentModel: backbone + one adaptor head per
teacher, added here); computes the summary and dense losses per teacher, logs each of them, and reports
per-teacher cosine similarity on validation. `teacher_targets` is the one place teacher features of a batch
are produced. Teacher weights are not stored in checkpoints (they are reloaded from their own files).
With `dense_loss: mse` the teachers' dense features are standardized by fixed per-channel statistics
(owned by each adaptor head) measured on `calibration_batches` training batches when training starts
(summed over all ranks), kept in the checkpoint and written to the export.
With `student_resolutions` each training step resizes the student's input to one resolution of the set
(RADIOv2.5-style multi-resolution training; the teachers still see the crop at their own resolution) and
validation also reports the cosines at each of them (`val/<teacher>/dense_cos@<size>`).
With `ema_decay` the module keeps an exponential moving average of the student (backbone + heads; torch's
`AveragedModel` + `get_ema_multi_avg_fn`, updated after every optimizer step, kept in the checkpoint under
`ema.student.*`); validation and the in-training benchmarks score it (`student_for`), `distill export` writes it.
With `students` (distill/students.py) more students learn from the same teacher pass: one teacher forward (or
cached batch) per batch, each student with its own heads, optimizer groups, EMA and export.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from distill import losses, losses_radio4
from distill.encoders.base import EncoderOutput
from distill.encoders.resize import resize
from distill.feature_norm import NORMALIZERS
from distill.grow import init_student_from
from distill.model import StudentModel
from distill.state_layout import upgrade_state_dict  # noqa: F401  (also imported from here)
from distill.common.schedule import warmup_cosine
from distill.students import StudentSpec
from distill.teacher import Teacher

DENSE_LOSSES = ("cosine_smooth_l1", "mse")
LOSS_BALANCES = ("fixed", "normalized")
SUMMARY_LOSSES = ("cosine", "angle_balanced")


class DistillModule(L.LightningModule):
    """Distill several frozen teachers into one student.

    Args:
        student: the student model (backbone only; the adaptor heads are added here, one per teacher); its
            ``summary_names`` must list the teachers that have a summary, in order.
        teachers: the frozen teachers with their loss weights.
        dense_loss: ``cosine_smooth_l1`` (a*cos + b*smooth-L1) or ``mse`` (MSE against teacher features
            standardized per channel with fixed statistics measured on ``calibration_batches`` batches).
        dense_cosine_weight: a, the cosine part of ``cosine_smooth_l1``.
        dense_smooth_l1_weight: b, the smooth-L1 part of ``cosine_smooth_l1``.
        adaptor_hidden_dim: hidden width of every adaptor MLP.
        adaptor_layers: Linear layers per adaptor MLP (>= 2).
        optimizer: optimizer factory called with the parameter groups (AdamW by default).
        warmup_steps: linear LR warmup steps.
        min_lr_ratio: final LR as a fraction of the peak LR at the end of the cosine decay.
        calibration_batches: with ``mse``, training batches (per rank) whose teacher features fix the
            standardization statistics before the first step; ignored by ``cosine_smooth_l1``.
        dense_normalizer: with ``mse``, the fixed map of the dense targets (distill/feature_norm.py):
            ``channel_standardizer`` (per-channel mean / std) or ``phi_s`` (PHI-S, RADIOv2.5: PCA rotation +
            Hadamard + one scale, every channel unit variance, invertible); exported with the adaptors.
        teacher_drop_prob: probability that a teacher is left out of a training step (each teacher
            independently, at least one always kept; UNIC / Theia-style teacher dropping). Dropped teachers
            are not run at all that step; with DDP use ``strategy: ddp_find_unused_parameters_true``.
        loss_balance: ``fixed`` (total = sum of weight * loss, as configured per teacher) or ``normalized``
            (every loss part is divided by a running mean of its own detached value, so each contributes
            ~weight whatever its scale; AdaLoss-style balancing that AM-RADIO discusses).
        loss_balance_momentum: the running mean's momentum (``normalized`` only): m * mean + (1 - m) * loss.
        student_resolutions: None (default): the student sees the data module's crop as it is. A list of
            square sizes (multiples of the student's patch size, e.g. ``[48, 64, 96]``): each training step
            resizes the student's input (bicubic, antialiased) to one of them, drawn from
            (``resolution_seed``, step) so a resumed run draws the same ones; the teachers still see the crop
            itself at their own resolution and the dense predictions are resized to each teacher's grid.
            Validation logs the usual keys on the crop as it is, and ``summary_cos@S`` / ``dense_cos@S`` per
            size S. Pair with ``student.cpe_max_grid`` so the position embedding is not stretched per size.
        resolution_seed: seed of the per-step resolution draw.
        val_resolutions: the sizes validation reports ``summary_cos@S`` / ``dense_cos@S`` at; None (default):
            ``student_resolutions`` (so a single-resolution run can be scored at several sizes too).
        student_size: None (default): the student sees the data module's crop as it is. A size S (a multiple of
            the patch size): the data's crop is the *teachers'* view, made as large as the largest teacher input
            (``data.image_size: 1024`` for SAM at its native resolution), and the student sees it resized
            (bicubic, antialiased) to S x S, in training (unless ``student_resolutions`` draws a size) and in
            validation. Each teacher resizes the crop to its own input, so a high-resolution teacher sees real
            detail instead of the student's crop upsampled (AM-RADIO gives SAM its native 1024 px input).
        summary_loss: ``cosine`` (mean 1 - cos) or ``angle_balanced`` (C-RADIOv4: (angle / the teacher's angular
            spread on the batch)^2, so a teacher with tightly clustered summaries is not under-weighted;
            distill/losses_radio4.py).
        shift_equivariant: C-RADIOv4's shift-equivariant dense loss (Sec. 2.3; distill/losses_radio4.py): in
            training the student and each teacher see the crop translated independently by whole student
            patches (zero fill), and the dense loss is computed on the cells both views saw, aligned, so the
            student cannot learn a teacher's fixed-pattern noise. With a teacher cache the cached targets are of
            the unshifted crop: only the student's view is shifted. Validation is never shifted.
        shift_std: the shifts' std in student patches: round(N(0, shift_std)) per axis and view (C-RADIOv4: 0.5);
            drawn from the global step alone, so a resumed run draws the same ones.
        init_from: None (default), or an export folder (``distill export --with-adaptors``) or a ``distill fit``
            checkpoint to grow: its backbone and the heads of teachers it has are loaded into this student
            (configs must match; distill/grow.py), heads of new teachers start fresh, and training covers all
            teachers. A resumed run (``--ckpt_path``) then loads its own checkpoint over it.
        ema_decay: None (default): no EMA. A decay d in (0, 1) (C-RADIOv4: 0.9996): keep an exponential moving
            average of the student's weights (backbone and adaptor heads; buffers such as the mse statistics are
            copied, not averaged), updated after every optimizer step: e_1 = w_1, e_k = d e_{k-1} + (1 - d) w_k.
            Validation and the in-training benchmarks use it (the trained weights until the first update), the
            checkpoint keeps it (exact resume) and `distill export` writes it unless given --no-ema. Training itself
            is unchanged. Roughly the last 1 / (1 - d) steps count: pick d so that this is well below max_steps.
        students: more students (distill.students.StudentSpec: name, student, lr_scale, adaptor sizes) trained
            next to ``student`` from the same teacher targets of every batch; each has its own adaptor heads,
            optimizer parameter groups, EMA and export (``distill export --student NAME``). Their logs are
            ``<stage>/<name>/<teacher>/<key>``; ``<stage>/loss`` sums all students. The benchmarks score ``student``.
    """

    def __init__(
        self,
        student: StudentModel,
        teachers: list[Teacher],
        dense_loss: str = "cosine_smooth_l1",
        dense_cosine_weight: float = 0.9,
        dense_smooth_l1_weight: float = 0.1,
        adaptor_hidden_dim: int = 1024,
        adaptor_layers: int = 2,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.01,
        calibration_batches: int = 16,
        dense_normalizer: str = "channel_standardizer",
        teacher_drop_prob: float = 0.0,
        loss_balance: str = "fixed",
        loss_balance_momentum: float = 0.99,
        student_resolutions: list[int] | None = None,
        resolution_seed: int = 0,
        val_resolutions: list[int] | None = None,
        student_size: int | None = None,
        summary_loss: str = "cosine",
        shift_equivariant: bool = False,
        shift_std: float = 0.5,
        init_from: str | None = None,
        ema_decay: float | None = None,
        students: list[StudentSpec] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["student", "teachers", "optimizer", "students"])
        extra = list(students or [])
        extra_names = [spec.name for spec in extra]
        if len(set(extra_names)) != len(extra_names) or set(extra_names) & {t.name for t in teachers}:
            raise ValueError(f"model.students: names {extra_names} must be unique and differ from the teachers' names "
                             f"{[t.name for t in teachers]}.")
        if dense_loss not in DENSE_LOSSES:
            raise ValueError(f"dense_loss must be one of {DENSE_LOSSES}, got {dense_loss!r}")
        names = [t.name for t in teachers]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"teachers need unique names and at least one teacher; got {names}")
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {calibration_batches}")
        if dense_normalizer not in NORMALIZERS:
            raise ValueError(f"dense_normalizer must be one of {sorted(NORMALIZERS)}, got {dense_normalizer!r}")
        if not 0.0 <= teacher_drop_prob < 1.0:
            raise ValueError(f"teacher_drop_prob must be in [0, 1), got {teacher_drop_prob}")
        if loss_balance not in LOSS_BALANCES:
            raise ValueError(f"loss_balance must be one of {LOSS_BALANCES}, got {loss_balance!r}")
        if not 0.0 <= loss_balance_momentum < 1.0:
            raise ValueError(f"loss_balance_momentum must be in [0, 1), got {loss_balance_momentum}")
        for key, sizes in (("student_resolutions", student_resolutions), ("val_resolutions", val_resolutions),
                           ("student_size", None if student_size is None else [student_size])):
            for size, model in ((size, model) for size in sizes or [] for model in [student] + [s.student for s in extra]):
                if size <= 0 or size % model.patch_size:
                    raise ValueError(
                        f"{key}: {size} is not a positive multiple of the student's patch size "
                        f"{model.patch_size}; use sizes such as {[model.patch_size * k for k in (4, 6, 8)]}."
                    )
        if summary_loss not in SUMMARY_LOSSES:
            raise ValueError(f"summary_loss must be one of {SUMMARY_LOSSES}, got {summary_loss!r}")
        if shift_std < 0:
            raise ValueError(f"shift_std must be >= 0 (student patches), got {shift_std}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) (e.g. 0.9996) or null for no EMA, got {ema_decay}")
        if student_resolutions is not None and not student_resolutions:
            raise ValueError("student_resolutions is an empty list; leave it unset (null) for a single resolution.")
        for t in teachers:
            _check_full_view(t)
        with_summary = [t.name for t in teachers if t.has_summary]
        for key, model in [("student", student)] + [(f"students[{s.name}].student", s.student) for s in extra]:
            if model.summary_names != with_summary:
                raise ValueError(
                    f"{key}.summary_names is {model.summary_names} but the teachers with a summary are {with_summary}; "
                    f"set model.{key}.init_args.summary_names: {with_summary}"
                )
        self.student = student
        self.teachers = nn.ModuleList(teachers)
        # mse only: each head owns the fixed normalizer of its dense targets (fitted by `calibrate`)
        normalizer = dense_normalizer if dense_loss == "mse" else None
        for t in teachers:
            student.add_adaptor(
                t.name, t.encoder.summary_dim, t.encoder.dense_dim, adaptor_hidden_dim, adaptor_layers, normalizer
            )
        self.grown = init_student_from(student, init_from) if init_from is not None else None
        self.dense_loss = dense_loss
        self.optimizer_factory = optimizer
        self.students = nn.ModuleDict({spec.name: spec.student for spec in extra})  # model.student is not in here
        self.lr_scales = {spec.name: spec.lr_scale for spec in extra}
        for spec in extra:
            for t in teachers:
                spec.student.add_adaptor(t.name, t.encoder.summary_dim, t.encoder.dense_dim,
                                         spec.adaptor_hidden_dim or adaptor_hidden_dim, spec.adaptor_layers or adaptor_layers,
                                         normalizer)
        # {student name: its EMA}; made after the heads exist so the average covers them
        self.ema = nn.ModuleDict({name: make_ema(model, ema_decay) for name, model in self.all_students().items()}
                                 if ema_decay is not None else {})
        if loss_balance == "normalized":  # running mean of every loss part [student x teacher, (summary, dense)]; 0 = unset
            self.register_buffer("loss_mean", torch.zeros((1 + len(extra)) * len(teachers), 2, dtype=torch.float64))

    @property
    def dense_norm(self) -> nn.ModuleDict:
        """{teacher: fixed dense normalizer} with dense_loss=mse, else empty (a view: the heads own them)."""
        return nn.ModuleDict({name: head.norm for name, head in self.student.heads.items() if head.norm is not None})

    def all_students(self) -> dict[str, StudentModel]:
        """{name: student}: "student" (model.student) first, then model.students in order."""
        return {"student": self.student, **self.students}

    def student_for(self, stage: str, name: str = "student") -> StudentModel:
        """The student `name` that `stage` runs: in training the trained weights; otherwise (validation,
        benchmarks) its EMA once that has been updated, else the trained weights."""
        ema = self.ema[name] if name in self.ema else None
        if stage == "train" or ema is None or ema.n_averaged.item() == 0:
            return self.all_students()[name]
        return ema.module

    def update_ema(self) -> None:
        """One EMA update of every student from its current weights (the first copies them)."""
        for name, model in self.all_students().items():
            if name in self.ema:
                self.ema[name].update_parameters(model)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()  # after every optimizer step (also with gradient accumulation)

    def teacher_targets(self, images: torch.Tensor, names: list[str] | None = None) -> dict[str, EncoderOutput]:
        """{teacher name: its features (summary, dense) of `images` in [0, 1]}: the distillation targets
        (of the teachers in `names`; None: all)."""
        return {t.name: t.targets(images) for t in self.teachers if names is None or t.name in names}

    def active_teachers(self, stage: str) -> list[str]:
        """The teachers of this step: all, or in training with teacher_drop_prob > 0 each dropped independently
        with that probability (torch's global RNG), at least one kept."""
        names = [t.name for t in self.teachers]
        p = self.hparams.get("teacher_drop_prob", 0.0)
        if stage != "train" or p == 0:
            return names
        keep = torch.rand(len(names)) >= p
        if not keep.any():
            keep[torch.randint(len(names), ())] = True
        return [name for name, k in zip(names, keep.tolist()) if k]

    def balanced(self, index: int, part: int, loss: torch.Tensor, stage: str) -> torch.Tensor:
        """loss_balance=normalized: loss / running mean of its detached value (updated in training; the first
        value starts the mean); fixed: the loss itself."""
        if self.hparams.get("loss_balance", "fixed") == "fixed":
            return loss
        mean = self.loss_mean[index, part]
        value = loss.detach().double()
        if stage == "train":
            m = self.hparams.loss_balance_momentum
            mean = torch.where(mean > 0, m * mean + (1 - m) * value, value)
            self.loss_mean[index, part] = mean
        elif mean <= 0:
            mean = value
        return loss / mean.clamp_min(1e-12).to(loss.dtype)

    def student_resolution(self, step: int) -> int | None:
        """The student's input size at training step `step`: one of `student_resolutions`, drawn from
        (resolution_seed, step) alone (no global RNG: resume-exact, the same on every rank); None when unset."""
        sizes = self.hparams.get("student_resolutions")
        if not sizes:
            return None
        generator = torch.Generator().manual_seed(self.hparams.get("resolution_seed", 0) * 1_000_003 + step)
        return int(sizes[int(torch.randint(len(sizes), (), generator=generator))])

    def validation_resolutions(self) -> list[int]:
        """The sizes validation scores the student at besides the crop itself (val_resolutions or student_resolutions)."""
        sizes = self.hparams.get("val_resolutions")
        return list(sizes if sizes is not None else self.hparams.get("student_resolutions") or [])

    def student_input(self, images: torch.Tensor, size: int | None) -> torch.Tensor:
        """`images` resized (bicubic, antialiased, clipped to [0, 1]) to size x size for the student; the images
        themselves when `size` is None or already theirs."""
        if size is None or tuple(images.shape[-2:]) == (size, size):
            return images
        return resize(images, (size, size), "bicubic")

    def teacher_losses(self, images: torch.Tensor, stage: str, cached: dict | None = None) -> torch.Tensor:
        """Total weighted loss over students and teachers: the teachers' targets once, then `student_losses` of
        every student. `cached`: {teacher: {"summary", "dense"}} targets from a teacher cache, used instead of
        running the teachers."""
        names = self.active_teachers(stage)
        size = self.student_resolution(self.global_step) if stage == "train" else None
        shifts = self.view_shifts(images, size or self.hparams.get("student_size"), names, cached) if stage == "train" else None
        # teacher cache (distill/cache): the cached teachers' targets came with the batch; others run here
        from_cache = [n for n in names if cached is not None and n in cached]
        targets = {n: EncoderOutput(summary=cached[n].get("summary"), dense=cached[n]["dense"]) for n in from_cache}
        online = [n for n in names if n not in from_cache]
        if shifts is None:
            targets.update(self.teacher_targets(images, online))
        else:
            targets.update({t.name: t.targets(losses_radio4.translate(images, *shifts["pixels"][t.name]))
                            for t in self.teachers if t.name in online})
        total = images.new_zeros(())
        for position, name in enumerate(self.all_students()):
            total = total + self.student_losses(images, targets, stage, name, position * len(self.teachers), shifts)
        self.log(f"{stage}/loss", total, prog_bar=True, batch_size=len(images), sync_dist=stage == "val")
        return total

    def student_losses(self, images: torch.Tensor, targets: dict[str, EncoderOutput], stage: str,
                       name: str = "student", offset: int = 0, shifts: dict | None = None) -> torch.Tensor:
        """Student `name`'s weighted loss against the teachers' `targets` (the teachers of this step); logs every
        part per teacher (and cosines on validation, also at every `validation_resolutions()` size) under
        `<stage>/` (model.student) or `<stage>/<name>/`. `offset`: its first row of `loss_mean`. `shifts`
        (`view_shifts`, shift_equivariant only): every student sees the crop moved by the student shift."""
        size = self.student_resolution(self.global_step) if stage == "train" else None
        view = images if shifts is None else losses_radio4.translate(images, *shifts["pixels"]["student"])
        student_input = self.student_input(view, size or self.hparams.get("student_size"))
        out = self.student_for(stage, name)(student_input, adaptors=list(targets))
        prefix = f"{stage}/" if name == "student" else f"{stage}/{name}/"
        total = images.new_zeros(())
        for index, teacher in enumerate(self.teachers, offset):
            if teacher.name not in targets:
                continue  # dropped this step
            target = targets[teacher.name]
            pred_summary, pred_dense = out.adaptors[teacher.name].summary, out.adaptors[teacher.name].dense
            pred_dense = losses.resize_to_grid(pred_dense, target.dense.shape[-2:])
            logs = {}
            if teacher.has_summary:
                logs["summary_loss"] = self._summary_loss(pred_summary, target.summary)
                total = total + teacher.summary_weight * self.balanced(index, 0, logs["summary_loss"], stage)
            target_dense = target.dense
            if shifts is not None:  # the cells both views saw, aligned (C-RADIOv4 shift equivariance)
                pred_dense, target_dense = losses_radio4.aligned_overlap(
                    pred_dense, target_dense, *self.cell_shifts(shifts, teacher.name, images, target_dense))
            logs["dense_loss"] = self._dense_loss(teacher.name, pred_dense, target_dense, stage)
            total = total + teacher.dense_weight * self.balanced(index, 1, logs["dense_loss"], stage)
            if stage == "val":
                if teacher.has_summary:
                    logs["summary_cos"] = losses.cosine_similarity(pred_summary, target.summary, dim=-1).mean()
                logs["dense_cos"] = losses.cosine_similarity(self.to_teacher_space(teacher.name, pred_dense), target.dense).mean()
            for key, value in logs.items():
                self.log(f"{prefix}{teacher.name}/{key}", value, batch_size=len(images), sync_dist=stage == "val")
        if name != "student":
            self.log(f"{prefix}loss", total, batch_size=len(images), sync_dist=stage == "val")
        if stage == "val":
            for size in self.validation_resolutions():
                self.log_cosines(images, targets, size, name)
        return total

    def log_cosines(self, images: torch.Tensor, targets: dict[str, EncoderOutput], size: int,
                    name: str = "student") -> None:
        """Validation cosines of student `name` at input size `size` against the teachers' `targets` of `images`:
        `val/[<name>/]<teacher>/summary_cos@<size>` and `val/[<name>/]<teacher>/dense_cos@<size>`."""
        prefix = "val/" if name == "student" else f"val/{name}/"
        out = self.student_for("val", name)(self.student_input(images, size))
        for teacher in self.teachers:
            target, pred = targets[teacher.name], out.adaptors[teacher.name]
            logs = {}
            if teacher.has_summary:
                logs["summary_cos"] = losses.cosine_similarity(pred.summary, target.summary, dim=-1).mean()
            dense = self.to_teacher_space(teacher.name, losses.resize_to_grid(pred.dense, target.dense.shape[-2:]))
            logs["dense_cos"] = losses.cosine_similarity(dense, target.dense).mean()
            for key, value in logs.items():
                self.log(f"{prefix}{teacher.name}/{key}@{size}", value, batch_size=len(images), sync_dist=True)

    def view_shifts(self, images: torch.Tensor, student_size: int | None, names: list[str], cached: dict | None) -> dict | None:
        """shift_equivariant only: {"pixels": {"student" | teacher: (dy, dx)}} translations of the crop for this
        training step, whole student patches (in crop pixels) drawn from the global step; cached teachers: (0, 0)."""
        if not self.hparams.get("shift_equivariant", False):
            return None
        crop = images.shape[-1]
        grid = (student_size or crop) // self.student.patch_size
        if crop % grid:
            raise ValueError(f"shift_equivariant: the crop ({crop} px) is not a whole number of student patches "
                             f"({grid} patches across); use a crop size divisible by {grid} or turn the option off.")
        stride = crop // grid  # one student patch in crop pixels
        generator = torch.Generator().manual_seed(7_919 * 1_000_003 + self.global_step)
        std = self.hparams.get("shift_std", 0.5)
        pixels = {"student": tuple(stride * k for k in losses_radio4.draw_shift(generator, std))}
        for t in self.teachers:  # every teacher draws, used or not: the draws do not depend on dropping
            shift = tuple(stride * k for k in losses_radio4.draw_shift(generator, std))
            pixels[t.name] = (0, 0) if cached is not None and t.name in cached else shift
        return {"pixels": pixels}

    @staticmethod
    def cell_shifts(shifts: dict, name: str, images: torch.Tensor, target_dense: torch.Tensor) -> tuple[tuple, tuple]:
        """The student's and teacher `name`'s pixel shifts in cells of the teacher's grid (ValueError if not whole)."""
        crop, grid = images.shape[-1], target_dense.shape[-1]
        cells = []
        for who in ("student", name):
            for px in shifts["pixels"][who]:
                if (px * grid) % crop:
                    raise ValueError(
                        f"shift_equivariant: teacher {name!r} has a {grid}-cell grid on a {crop} px crop, so a shift "
                        f"of {px} px (whole student patches) is not a whole number of its cells; use a student patch "
                        f"grid that divides the teacher's, or turn shift_equivariant off.")
            cells.append(tuple(px * grid // crop for px in shifts["pixels"][who]))
        return cells[0], cells[1]

    def _summary_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.hparams.get("summary_loss", "cosine") == "angle_balanced":
            return losses_radio4.summary_angle_balanced(pred, target)
        return losses.summary_cosine(pred, target)

    def _dense_loss(self, name: str, pred: torch.Tensor, target: torch.Tensor, stage: str) -> torch.Tensor:
        if self.dense_loss == "mse":
            norm = self.student.heads[name].norm  # not self.dense_norm: that builds a ModuleDict per call
            if stage == "train" and not norm.fitted:
                raise RuntimeError(
                    f"dense_loss=mse: the statistics of teacher '{name}' are not calibrated; DistillModule.calibrate "
                    "runs at the start of fit (call it yourself when training outside a Trainer)."
                )
            return losses.dense_mse(pred, norm(target))
        return losses.dense_cosine_smooth_l1(
            pred, target, self.hparams.dense_cosine_weight, self.hparams.dense_smooth_l1_weight
        )

    def to_teacher_space(self, name: str, pred_dense: torch.Tensor) -> torch.Tensor:
        """Undo the standardization of the MSE loss so predictions compare with raw teacher features."""
        return self.student.heads[name].to_teacher_space(pred_dense)

    @torch.no_grad()
    def calibrate(self, batches) -> None:
        """Fit the mse normalizers on the teachers' features of `batches` (images in [0, 1]); with a Trainer
        attached, the statistics are summed over all ranks first so every rank fits identical values."""
        if not self.dense_norm:
            return  # cosine_smooth_l1 has nothing to calibrate
        norms = nn.ModuleDict({n: norm for n, norm in self.dense_norm.items() if not norm.fitted})  # init_from keeps its own
        if not norms:
            return
        sums = {name: None for name in norms}
        for images in batches:
            images = images.to(self.device)
            if images.numel() == 0:
                continue
            targets = self.teacher_targets(images, list(norms))
            for teacher in self.teachers:
                if teacher.name not in norms:
                    continue
                batch_sums = norms[teacher.name].statistics(targets[teacher.name].dense)
                sums[teacher.name] = batch_sums if sums[teacher.name] is None else sums[teacher.name] + batch_sums
        for teacher in self.teachers:
            if teacher.name not in norms:
                continue
            norm, total = norms[teacher.name], sums[teacher.name]
            if total is None:  # no images here: still join the reduce so other ranks do not wait forever
                total = norm.statistics(torch.zeros(1, teacher.encoder.dense_dim, 1, 1, device=self.device)) * 0
            if self._trainer is not None:
                total = self.trainer.strategy.reduce(total, reduce_op="sum")
            if total[0] < 2:
                raise ValueError("DistillModule.calibrate got no images; check the training data source.")
            norm.fit(total)
            for other in self.students.values():  # every student's head learns the same normalized targets
                other.heads[teacher.name].norm.load_state_dict(norm.state_dict())

    def on_train_start(self) -> None:
        # Fixed statistics, measured once: a resumed run keeps the ones in its checkpoint.
        if not self.dense_norm or all(norm.fitted for norm in self.dense_norm.values()):
            return
        loader = self.trainer.train_dataloader
        count = self.hparams.calibration_batches
        # Raw loader batches are {"images", "skipped"} (the datamodule's transfer hook is not applied here).
        self.calibrate(batch["images"] if isinstance(batch, dict) else batch for _, batch in zip(range(count), loader))

    def training_step(self, images: torch.Tensor | dict, batch_idx: int) -> torch.Tensor | None:
        cached = images.get("targets") if isinstance(images, dict) else None  # teacher cache batches are dicts
        images = images["images"] if isinstance(images, dict) else images
        if images.numel() == 0:
            return None  # every image of this batch was skipped as corrupt
        return self.teacher_losses(images, "train", cached)

    def validation_step(self, images: torch.Tensor, batch_idx: int) -> None:
        if images.numel():
            self.teacher_losses(images, "val")

    def parameter_groups(self) -> list[dict]:
        """Trainable parameters grouped by timm's `param_groups_weight_decay`, per student: no weight decay on the
        student's `no_weight_decay()` set (pos_embed, class / register tokens), norms and biases; the rest decays
        with the optimizer's own `weight_decay`. Groups of model.students carry their `lr_scale`."""
        groups = []
        for name, model in self.all_students().items():
            skip = [f"model.{key}" for key in model.model.no_weight_decay()]
            for group in param_groups_weight_decay(model, weight_decay=1.0, no_weight_decay_list=skip):
                if group["weight_decay"]:
                    del group["weight_decay"]  # placeholder above; the optimizer's configured value applies
                if name != "student":
                    group["lr_scale"] = self.lr_scales[name]
                groups.append(group)
        return groups

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameter_groups())
        for group in optimizer.param_groups:  # before the schedule reads each group's initial lr
            group["lr"] *= group.get("lr_scale", 1.0)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = warmup_cosine(optimizer, self.hparams.warmup_steps, total, self.hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def export_metadata(self) -> dict:
        """Everything `distill export` needs to rebuild the student and heads without the teachers."""
        return {
            "student": self.student.config(),
            "heads": self.student.adaptors_config(),
            "students": {name: {"student": model.config(), "heads": model.adaptors_config()}
                         for name, model in self.students.items()},
            "dense_loss": self.dense_loss,
            "dense_norm": self.hparams.get("dense_normalizer", "channel_standardizer") if self.dense_norm else None,
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
        upgrade_state_dict(checkpoint["state_dict"])
        match_ema_keys(checkpoint["state_dict"], self.ema)


def make_ema(student: StudentModel, decay: float) -> AveragedModel:
    """An EMA of `student` (a frozen copy, never trained); its buffers follow the student's on every update."""
    ema = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    return ema.requires_grad_(False)


def match_ema_keys(state: dict, ema: nn.ModuleDict) -> None:
    """Fit a checkpoint's EMA entries (in place) to the module's EMA: a checkpoint without them starts the EMA
    afresh (n_averaged 0: the next update copies the weights); EMA entries of a module without EMA are dropped."""
    for key in [k for k in state if k.startswith("ema.") and k.split(".")[1] not in ema]:
        del state[key]
    for key, value in ema.state_dict().items():
        if f"ema.{key}" not in state:
            state[f"ema.{key}"] = torch.zeros_like(value) if key.endswith("n_averaged") else value


def _check_full_view(teacher: Teacher) -> None:
    """Refuse teachers that centre-crop (crop_pct < 1): their feature grid would not line up with the student's."""
    crop_pct = getattr(teacher.encoder, "crop_pct", 1.0)
    if crop_pct < 1.0:
        name = getattr(teacher.encoder, "model_name", type(teacher.encoder).__name__)
        raise ValueError(
            f"Teacher '{teacher.name}' ({name}) centre-crops with crop_pct={crop_pct}: it would see only the middle "
            f"{crop_pct:.0%} of the view the student sees, so dense features would be spatially misregistered. "
            "Set crop_pct: 1.0 in the teacher encoder's init_args (the whole image, resized to its input size)."
        )
