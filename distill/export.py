"""Export a trained student from a distillation checkpoint for other tools.

    python -m distill export --ckpt runs/distill/toy/last.ckpt --out exports/toy [--with-adaptors] [--onnx] [--no-ema]

The checkpoint's student weights (its EMA, `ema.student.module.*`, when the run kept one with `model.ema_decay`
and it has been updated; the trained `student.*` weights with --no-ema or without an EMA) are loaded into distill.model.StudentModel, which writes itself
(`StudentModel.export`): the backbone with timm's own `save_for_hf` (config.json + model.safetensors), so any of

    timm.create_model("local-dir:exports/toy", pretrained=True)
    transformers.TimmWrapperModel.from_pretrained("exports/toy")     # or transformers.AutoModel
    distill.exported.StudentEncoder("exports/toy")

rebuilds the backbone without unitower installed. `num_classes` stays out of `model_args`
(transformers passes num_classes=0 itself and would get it twice). Prefix token i of the backbone is
the summary token of teacher config["unitower"]["summary_names"][i]. With --with-adaptors,
adaptors.safetensors and adaptors.json hold the per-teacher heads and, for dense_loss=mse, their fixed
feature normalizers ("<teacher>.norm.*"), plus the token layout (load them with StudentModel.from_export).
A multi-student run (`model.students`) exports one student with --student NAME (default: model.student) or each
into OUT/<name>/ with --all-students. With --onnx, student.onnx holds the same model for ONNX runtimes (distill/onnx_export.py: dynamic batch and
image size; with --with-adaptors the heads' predictions are outputs too).
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill.common.io import load_checkpoint as read_checkpoint
from distill.model import StudentModel
from distill.state_layout import upgrade_state_dict


def load_checkpoint(ckpt: str | Path) -> dict:
    """Read a Lightning checkpoint written by DistillModule (tensors and plain data only)."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        where = "" if ckpt.is_absolute() else f" (in {Path.cwd()})"
        raise FileNotFoundError(f"Checkpoint {ckpt}{where} does not exist; pass the .ckpt of a `unitower distill fit` "
                                "run (e.g. runs/distill/toy/last.ckpt).")
    checkpoint = read_checkpoint(ckpt, "distill export --ckpt")  # weights_only=True always
    if "unitower" not in checkpoint:
        raise ValueError(f"{ckpt} has no 'unitower' metadata: it was not written by distill.module.DistillModule.")
    return checkpoint


def student_names(ckpt: str | Path) -> list[str]:
    """The students of a DistillModule checkpoint: "student" (model.student), then model.students in order."""
    return ["student", *load_checkpoint(ckpt)["unitower"].get("students", {})]


def student_from_checkpoint(ckpt: str | Path, ema: bool = True, student: str = "student") -> tuple[StudentModel, dict]:
    """The trained StudentModel (backbone + every adaptor head) of a DistillModule checkpoint, and its metadata;
    with `ema` its EMA weights when the checkpoint has an updated EMA (metadata["weights"] says which: ema / raw).
    `student`: which student of a multi-student run ("student": model.student; else a model.students name)."""
    checkpoint = load_checkpoint(ckpt)
    meta, state = checkpoint["unitower"], upgrade_state_dict(dict(checkpoint["state_dict"]))
    if student != "student":
        extra = meta.get("students", {})
        if student not in extra:
            raise KeyError(f"{ckpt} has no student {student!r}; its students are {['student', *extra]} "
                           "(pass one of them to --student).")
        meta = {**meta, **extra[student]}
    raw = "student." if student == "student" else f"students.{student}."
    if not any(k.startswith(f"{raw}model.") for k in state):
        raise ValueError(f"{ckpt} holds no '{raw}model.*' weights.")
    model = StudentModel(**meta["student"])
    for name, head in meta["heads"].items():
        args = {k: v for k, v in head.items() if k != "student_dim"}
        args.setdefault("normalizer", meta.get("dense_norm"))  # checkpoints from before the heads owned it
        model.add_adaptor(name, **args)
    prefix = raw
    if ema and state.get(f"ema.{student}.n_averaged", torch.zeros(())).item() > 0:
        prefix = f"ema.{student}.module."
    model.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    meta = {**meta, "weights": "ema" if prefix.startswith("ema.") else "raw"}
    if meta["dense_loss"] == "mse" and not all(head.norm.fitted for head in model.heads.values()):
        raise ValueError(f"{ckpt}: dense_loss=mse but the checkpoint holds no fitted dense normalizer statistics.")
    return model, meta


def export_student(ckpt: str | Path, out: str | Path, with_adaptors: bool = False, onnx: bool = False,
                   ema: bool = True, student: str = "student") -> Path:
    """Write the student backbone (and optionally the adaptor heads) from `ckpt` into folder `out`; with `onnx`
    also out/student.onnx (with the heads' outputs when `with_adaptors`; see distill/onnx_export.py); with `ema`
    (default) the EMA weights when the checkpoint has them, else the trained weights (config.json["unitower"]
    ["weights"] says which); `student`: which student of a multi-student run (see `student_names`)."""
    if onnx:
        from distill.onnx_export import check_onnx_packages

        check_onnx_packages()  # before any work: a missing extra is reported at once
    model, meta = student_from_checkpoint(ckpt, ema=ema, student=student)
    extra = {"teachers": meta["teachers"], "dense_loss": meta["dense_loss"], "dense_norm": meta.get("dense_norm"),
             "weights": meta["weights"]}
    folder = model.export(out, with_adaptors=with_adaptors, extra=extra)
    if onnx:
        from distill.onnx_export import ONNX_FILE, export_onnx

        export_onnx(model, folder / ONNX_FILE, with_adaptors=with_adaptors)
    return folder
