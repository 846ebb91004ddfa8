"""Grow a trained student: load its backbone and adaptor heads into a freshly configured one (`model.init_from`).

    source = load_student("exports/toy")          # an export folder (StudentModel.export) or a fit's .ckpt
    report = init_student_from(student, "runs/distill/toy/last.ckpt")
    report.loaded, report.new                      # heads copied from the source / heads left as initialised

The configured student must have the source's backbone (same timm architecture and model_args, normalization
and position-embedding grid); its summary_names may extend the source's (a new teacher's summary token reuses a
register token when num_registers is one less, so the prefix-token count stays the same). Heads of teachers the
source has are copied (their configs must match, a fitted mse normalizer included); heads of new teachers keep
their fresh initialisation; source heads of teachers no longer configured are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from distill.common.state_dicts import key_differences
from distill.export import student_from_checkpoint
from distill.model import StudentModel

BACKBONE_KEYS = ("model_name", "model_args", "mean", "std", "cpe_max_grid")


@dataclass
class GrowReport:
    """The teachers whose heads came from the source (`loaded`) and those that start fresh (`new`)."""

    loaded: list[str]
    new: list[str]


def load_student(path: str | Path) -> StudentModel:
    """The StudentModel (backbone + every head) of an export folder or a DistillModule checkpoint file."""
    path = Path(path)
    if path.is_dir():
        return StudentModel.from_export(path)
    if path.is_file():
        return student_from_checkpoint(path)[0]
    raise FileNotFoundError(f"model.init_from: {path} does not exist; give an export folder (`distill export "
                            "--with-adaptors`) or the .ckpt of a `distill fit` run.")


def init_student_from(student: StudentModel, source: str | Path | StudentModel) -> GrowReport:
    """Copy the backbone and the matching heads of `source` (a path for `load_student`, or a model) into `student`."""
    where = f"model.init_from ({source})" if not isinstance(source, StudentModel) else "model.init_from"
    src = source if isinstance(source, StudentModel) else load_student(source)
    check_backbones_match(src, student, where)
    student.model.load_state_dict(src.model.state_dict())
    loaded, new = [], []
    for name, head in student.heads.items():
        if name not in src.heads:
            new.append(name)
            continue
        theirs = dict(src.heads[name].config)
        for key in sorted(set(theirs) | set(head.config)):
            if theirs.get(key) != head.config.get(key):
                raise ValueError(f"{where}: the adaptor head of teacher {name!r} differs in {key!r}: source "
                                 f"{theirs.get(key)!r}, configured {head.config.get(key)!r}; configure the same "
                                 "adaptor (adaptor_hidden_dim / adaptor_layers / dense_loss) or rename the teacher.")
        head.load_state_dict(src.heads[name].state_dict())
        loaded.append(name)
    return GrowReport(loaded=loaded, new=new)


def check_backbones_match(src: StudentModel, student: StudentModel, where: str) -> None:
    """ValueError naming the first config key (and both values) in which the two backbones differ."""
    mine, theirs = student.config(), src.config()
    for key in BACKBONE_KEYS:
        a, b = theirs.get(key), mine.get(key)
        if key == "model_args":
            for arg in sorted(set(a) & set(b)):  # an export's config.json also lists timm's defaults (global_pool...)
                if a[arg] != b[arg]:
                    raise ValueError(f"{where}: the source's backbone has model_args.{arg}={a.get(arg)!r} but the "
                                     f"configured student has {b.get(arg)!r}; set model.student.init_args to the "
                                     "source's backbone config (reg_tokens = summary tokens + num_registers - 1).")
        elif _differs(a, b):
            raise ValueError(f"{where}: the source's backbone has {key}={a!r} but the configured student has {b!r}; "
                             f"set model.student.init_args.{key} to {a!r}.")
    differences = key_differences(student.model.state_dict(), src.model.state_dict())
    if differences:  # an architecture argument one side leaves at timm's default
        raise ValueError(f"{where}: the source's backbone weights do not fit the configured student: missing "
                         f"{differences.missing[:3]}, unexpected {differences.unexpected[:3]}, shapes (source vs "
                         f"configured) {differences.misshapen[:3]}; set model.student.init_args to the source's config.")
    old, now = theirs["summary_names"], mine["summary_names"]
    if now[: len(old)] != old:
        raise ValueError(f"{where}: the source's summary_names {old} must be the start of the configured "
                         f"summary_names {now} (each summary token keeps its teacher); list the new teachers after them.")


def _differs(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) != len(b) or not torch.allclose(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    return a != b
