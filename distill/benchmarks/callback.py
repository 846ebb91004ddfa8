"""In-training encoder benchmarks: a Lightning callback that scores the student with frozen-feature probes during
validation and logs the scores next to the teachers' own on the same images.

    trainer:
      callbacks:
        - class_path: distill.benchmarks.EncoderBenchmarks
          init_args: {probes: [knn, zeroshot, sam_miou], num_bank: 1000, num_query: 500, every_n_validations: 1}

Logged keys (`<set>` = texture / shape on the toy world, `class` for a labelled folder):
    bench/knn_<set>/student          k-NN on the student backbone's summary tokens (each L2-normalized, concatenated)
    bench/knn_<set>/student_pooled   k-NN on the mean of the student backbone's patch map
    bench/knn_<set>/student_<T>      k-NN on the student's adaptor prediction of teacher T's summary (knn_teacher)
    bench/knn_<set>/<T>              k-NN on teacher T's own summary (mean-pooled dense map without one)
    bench/zeroshot_<set>/student     zero-shot through the CLIP adaptor's summary + the CLIP teacher's text tower
    bench/zeroshot_<set>/<clip>      zero-shot of the CLIP teacher itself
    bench/sam_miou/student           one-point mIoU: SAM's prompt encoder + mask decoder fed the SAM adaptor's dense map
    bench/sam_miou/<sam>             the same with the SAM teacher's own image embeddings
Teacher scores and text features are computed once per run; the student is scored at every `every_n_validations`-th
validation (never in the sanity check) and, with `at_start`, when training starts. The scores come from
distill/encoders/probes.py (shared with `unitower toy report`); the image sets from distill/benchmarks/sets.py.
Only global rank 0 scores.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from distill.benchmarks.sets import ProbeSet, folder_probe_set, toy_probe_set
from distill.encoders.probes import knn_accuracy, point_miou, zero_shot_accuracy
from distill.losses import resize_to_grid

PROBES = ("knn", "zeroshot", "sam_miou")


class EncoderBenchmarks(L.Callback):
    """Frozen-feature probes of the student vs the teachers, logged during validation (see the module docstring).

    Args:
        probes: the probes to run: ``knn`` (k-NN accuracy of frozen features), ``zeroshot`` (classification through
            the CLIP adaptor's summary and the CLIP teacher's own text tower), ``sam_miou`` (masks from SAM's own
            prompt encoder + mask decoder fed the SAM adaptor's dense features; needs ground-truth masks, so toy
            world only).
        num_bank: k-NN bank images (labelled; toy: single-object training-world images).
        num_query: query images of k-NN and zero-shot (toy: single-object held-out images).
        num_mask_images: images with ground-truth masks for ``sam_miou`` (toy: held-out multi-object images).
        every_n_validations: score at every n-th validation run (1: every one; sanity checks never).
        at_start: also score when training starts, before the first optimizer step (logged at that step).
        labelled_folder: a folder of class subfolders (torchvision ImageFolder layout; or with ``train/`` and
            ``val/`` class folders for bank and queries) for ``knn`` and ``zeroshot`` on real data; None = the toy
            world's labels and masks.
        zeroshot_templates: prompt templates filled with each class name of ``labelled_folder`` ('{}' = the name;
            several per class: the best-matching prompt decides).
        image_size: side of the square probe images; None = the student's ``img_size``.
        knn_k: neighbours in the k-NN majority vote (cosine similarity).
        knn_teacher: the teacher the k-NN compares with (its summary, or its mean-pooled dense map without one);
            the student's adaptor for it is scored too.
        clip_teacher: the teacher whose text tower gives the zero-shot classifier (an ``OpenClipEncoder`` at
            ``layer: -1``, whose summary is the joint image-text embedding).
        sam_teacher: the SAM teacher (a ``SamEncoder`` at ``layer: -1``) whose prompt encoder and mask decoder
            turn embeddings into masks.
        batch_size: images per forward pass.
        seed: seed of the labelled folder's shuffle.
    """

    def __init__(
        self,
        probes: list[str] | None = None,
        num_bank: int = 1000,
        num_query: int = 500,
        num_mask_images: int = 200,
        every_n_validations: int = 1,
        at_start: bool = True,
        labelled_folder: str | None = None,
        zeroshot_templates: list[str] | None = None,
        image_size: int | None = None,
        knn_k: int = 10,
        knn_teacher: str = "dino",
        clip_teacher: str = "clip",
        sam_teacher: str = "sam",
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.probes = list(PROBES if probes is None else probes)
        unknown = [p for p in self.probes if p not in PROBES]
        if unknown or not self.probes:
            raise ValueError(f"EncoderBenchmarks: probes {self.probes} must be a non-empty subset of {list(PROBES)}.")
        if labelled_folder is not None and "sam_miou" in self.probes:
            raise ValueError("EncoderBenchmarks: sam_miou needs ground-truth masks, which a labelled_folder does not "
                             "have (toy world only); drop sam_miou from probes.")
        for name, value in (("num_bank", num_bank), ("num_query", num_query), ("every_n_validations", every_n_validations),
                            ("knn_k", knn_k), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"EncoderBenchmarks: {name} must be >= 1, got {value}.")
        if "sam_miou" in self.probes and num_mask_images < 1:
            raise ValueError(f"EncoderBenchmarks: num_mask_images must be >= 1 with sam_miou, got {num_mask_images}.")
        self.num_bank, self.num_query, self.num_mask_images = num_bank, num_query, num_mask_images
        self.every_n_validations, self.at_start = every_n_validations, at_start
        self.labelled_folder = labelled_folder
        self.zeroshot_templates = list(zeroshot_templates or ["a photo of a {}."])
        self.image_size, self.knn_k, self.batch_size, self.seed = image_size, knn_k, batch_size, seed
        self.knn_teacher, self.clip_teacher, self.sam_teacher = knn_teacher, clip_teacher, sam_teacher
        self.validations = 0
        self.started = False
        self.probe_set: ProbeSet | None = None
        self.teacher_scores: dict[str, float] | None = None
        self.text_features: torch.Tensor | None = None
        self.last_scores: dict[str, float] = {}

    # ---- Lightning hooks ------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._teachers(pl_module)  # fail at the start of the run, not at the first validation

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        # at the first batch, not in on_train_start: the module's on_train_start (mse calibration) has run by then
        if self.started or not self.at_start:
            return
        self.started = True
        if trainer.is_global_zero:
            scores = self.score(pl_module)
            for logger in trainer.loggers:
                logger.log_metrics(scores, step=trainer.global_step)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every_n_validations or not trainer.is_global_zero:
            return
        for key, value in self.score(pl_module).items():
            pl_module.log(key, value, rank_zero_only=True)

    # ---- scoring ------------------------------------------------------------------------------------------
    def score(self, pl_module: L.LightningModule) -> dict[str, float]:
        """Every probe's score for the student now and for the teachers (computed once); also kept in `last_scores`."""
        start = time.perf_counter()
        teachers = self._teachers(pl_module)
        student = pl_module.student_for("val")  # the EMA when the module keeps one
        device = pl_module.device
        if self.probe_set is None:
            self.probe_set = self._build_set(student)
        was_training = student.training
        student.eval()
        try:
            with torch.inference_mode():
                scores = self._student_scores(student, teachers, device)
                if self.teacher_scores is None:
                    self.teacher_scores = self._teacher_scores(teachers, device)
        finally:
            student.train(was_training)
        scores.update(self.teacher_scores)
        self.last_scores = dict(sorted(scores.items()))
        rank_zero_info(f"[bench] step {pl_module.global_step} ({time.perf_counter() - start:.1f} s): " + ", ".join(
            f"{key.removeprefix('bench/')} {value:.3f}" for key, value in self.last_scores.items()))
        return self.last_scores

    def _teachers(self, pl_module: L.LightningModule) -> dict[str, torch.nn.Module]:
        """{probe role: Teacher} for the probes in use, checked against what each probe needs."""
        by_name = {t.name: t for t in pl_module.teachers}
        roles = {"knn": self.knn_teacher, "zeroshot": self.clip_teacher, "sam_miou": self.sam_teacher}
        found = {}
        for probe in self.probes:
            name = roles[probe]
            if name not in by_name:
                raise ValueError(f"EncoderBenchmarks: probe {probe} uses teacher {name!r}, but the teachers are "
                                 f"{sorted(by_name)}; set the callback's {_ROLE_ARGS[probe]} to one of them.")
            encoder = by_name[name].encoder
            needs = {"zeroshot": "clip_model", "sam_miou": "sam_model"}.get(probe)
            if needs and (not hasattr(encoder, needs) or getattr(encoder, "layer", -1) != -1):
                raise ValueError(
                    f"EncoderBenchmarks: probe {probe} needs teacher {name!r} to be "
                    f"{'an OpenClipEncoder' if probe == 'zeroshot' else 'a SamEncoder'} at layer -1 (its "
                    f"{'joint image-text embedding' if probe == 'zeroshot' else 'mask decoder input'}); it is "
                    f"{type(encoder).__name__} at layer {getattr(encoder, 'layer', '?')}. Drop {probe} from probes.")
            found[probe] = by_name[name]
        return found

    def _build_set(self, student: torch.nn.Module) -> ProbeSet:
        size = self.image_size or student.img_size
        if self.labelled_folder is not None:
            return folder_probe_set(self.labelled_folder, size, self.num_bank, self.num_query,
                                    self.zeroshot_templates, self.seed)
        labelled = "knn" in self.probes or "zeroshot" in self.probes
        return toy_probe_set(size, self.num_bank if "knn" in self.probes else 0, self.num_query if labelled else 0,
                             self.num_mask_images if "sam_miou" in self.probes else 0)

    def _batches(self, images: torch.Tensor, device: torch.device) -> Iterator[torch.Tensor]:
        for chunk in images.split(self.batch_size):
            yield chunk.to(device).float() / 255.0

    def _features(self, images: torch.Tensor, device: torch.device,
                  read: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """{name: features of every image} from `read(batch in [0, 1]) -> {name: [B, ...]}`, batch by batch."""
        parts = defaultdict(list)
        for batch in self._batches(images, device):
            for name, value in read(batch).items():
                parts[name].append(value)
        return {name: torch.cat(values) for name, values in parts.items()}

    def _student_scores(self, student, teachers: dict, device: torch.device) -> dict[str, float]:
        probe_set, scores = self.probe_set, {}
        knn_name = self.knn_teacher
        clip_name = teachers["zeroshot"].name if "zeroshot" in teachers else None
        adaptors = [t.name for t in teachers.values()]

        def read(batch: torch.Tensor) -> dict[str, torch.Tensor]:
            out = student(batch, adaptors=adaptors, teacher_space=True)
            pooled = out.dense.mean(dim=(2, 3))
            summary = torch.cat([F.normalize(s, dim=-1) for s in out.summary.values()], -1) if out.summary else pooled
            feats = {"student": summary, "student_pooled": pooled}
            if "knn" in teachers:
                feats[f"student_{knn_name}"] = _summary_or_pooled(out.adaptors[knn_name].summary, out.adaptors[knn_name].dense)
            if clip_name is not None:
                feats["clip_summary"] = out.adaptors[clip_name].summary
            return feats

        if "knn" in teachers or clip_name is not None:
            query = self._features(probe_set.query.images, device, read)
        if "knn" in teachers:
            bank = self._features(probe_set.bank.images, device, read)
            for attribute in probe_set.knn_attributes:
                for name in ("student", "student_pooled", f"student_{knn_name}"):
                    scores[f"bench/knn_{attribute}/{name}"] = self._knn(bank[name], query[name], attribute)
        if clip_name is not None:
            scores.update(self._zero_shot(teachers["zeroshot"], query["clip_summary"], "student"))
        if "sam_miou" in teachers:
            sam_name = teachers["sam_miou"].name
            sam = teachers["sam_miou"].encoder.sam_model()
            grid = tuple(sam.prompt_encoder.image_embedding_size)
            scores["bench/sam_miou/student"] = self._miou(
                sam, device, lambda batch: resize_to_grid(student(batch, adaptors=[sam_name], teacher_space=True)
                                                          .adaptors[sam_name].dense, grid))
        return scores

    def _teacher_scores(self, teachers: dict, device: torch.device) -> dict[str, float]:
        probe_set, scores = self.probe_set, {}
        if "knn" in teachers:
            teacher = teachers["knn"]

            def read(batch: torch.Tensor) -> dict[str, torch.Tensor]:
                out = teacher.targets(batch)
                return {"features": _summary_or_pooled(out.summary, out.dense)}

            bank = self._features(probe_set.bank.images, device, read)["features"]
            query = self._features(probe_set.query.images, device, read)["features"]
            for attribute in probe_set.knn_attributes:
                scores[f"bench/knn_{attribute}/{teacher.name}"] = self._knn(bank, query, attribute)
        if "zeroshot" in teachers:
            teacher = teachers["zeroshot"]
            image = self._features(probe_set.query.images, device, lambda b: {"summary": teacher.targets(b).summary})
            scores.update(self._zero_shot(teacher, image["summary"], teacher.name))
        if "sam_miou" in teachers:
            teacher = teachers["sam_miou"]
            scores[f"bench/sam_miou/{teacher.name}"] = self._miou(
                teacher.encoder.sam_model(), device, lambda batch: teacher.targets(batch).dense)
        return scores

    def _knn(self, bank: torch.Tensor, query: torch.Tensor, attribute: str) -> float:
        probe_set = self.probe_set
        return knn_accuracy(bank, probe_set.bank.labels[attribute], query, probe_set.query.labels[attribute], self.knn_k)

    def _zero_shot(self, teacher, image_features: torch.Tensor, who: str) -> dict[str, float]:
        probe_set = self.probe_set
        if self.text_features is None:
            self.text_features = text_features(teacher.encoder, probe_set.prompts, image_features.device, self.batch_size)
        return {f"bench/zeroshot_{attribute}/{who}": zero_shot_accuracy(
                    image_features, self.text_features, classes, probe_set.query.labels[attribute])
                for attribute, classes in probe_set.prompt_classes.items()}

    def _miou(self, sam, device: torch.device, embed: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """Mean IoU over every mask of the probe set; `embed(batch in [0, 1])` gives SAM-grid embeddings."""
        sam.prompt_encoder.to(device)
        sam.mask_decoder.to(device)
        masks, total, count = self.probe_set.masks, 0.0, 0
        for start, batch in zip(range(0, len(masks), self.batch_size), self._batches(self.probe_set.masked_images, device)):
            batch_masks = masks[start : start + len(batch)]
            objects = sum(len(m) for m in batch_masks)
            if objects:
                total += point_miou(sam, embed(batch), batch_masks) * objects
                count += objects
        return total / max(1, count)


_ROLE_ARGS = {"knn": "knn_teacher", "zeroshot": "clip_teacher", "sam_miou": "sam_teacher"}


def _summary_or_pooled(summary: torch.Tensor | None, dense: torch.Tensor) -> torch.Tensor:
    return summary if summary is not None else dense.mean(dim=(2, 3))


@torch.inference_mode()
def text_features(encoder, prompts: list[str], device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """open_clip `encode_text` of `prompts` [P, D] by the text tower of an OpenClipEncoder's own model."""
    model, tokenizer = encoder.clip_model(), encoder.tokenizer()
    model.to(device).eval()
    tokens = tokenizer(prompts)
    return torch.cat([model.encode_text(chunk.to(device)) for chunk in tokens.split(batch_size)]).float()
