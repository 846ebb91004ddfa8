"""Export a trained student from a distillation checkpoint for other tools.

    python -m distill export --ckpt runs/distill/toy/last.ckpt --out exports/toy [--with-adaptors]

Writes timm's own local-folder format (config.json + model.safetensors), so that any of

    timm.create_model("local-dir:exports/toy", pretrained=True)
    transformers.TimmWrapperModel.from_pretrained("exports/toy")     # or transformers.AutoModel
    distill.exported.StudentEncoder("exports/toy")

rebuilds the backbone without unitower installed. `num_classes` stays out of `model_args`
(transformers passes num_classes=0 itself and would get it twice). Prefix token i of the backbone is
the summary token of teacher config["unitower"]["summary_names"][i]. With --with-adaptors,
adaptors.safetensors and adaptors.json hold the per-teacher heads and, for dense_loss=mse, the fixed
feature normalizers ("dense_norm.<teacher>.*"; load them with distill.exported.StudentEncoder).
"""

from __future__ import annotations

from pathlib import Path

from distill.io import load_checkpoint as read_checkpoint
from distill.io import save_json, save_safetensors


def load_checkpoint(ckpt: str | Path) -> dict:
    """Read a Lightning checkpoint written by DistillModule (tensors and plain data only)."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"Checkpoint {ckpt} does not exist; pass the .ckpt of a `python -m distill fit` run.")
    checkpoint = read_checkpoint(ckpt, "distill export --ckpt")  # weights_only=True always
    if "unitower" not in checkpoint:
        raise ValueError(f"{ckpt} has no 'unitower' metadata: it was not written by distill.module.DistillModule.")
    return checkpoint


def timm_config(meta: dict) -> dict:
    """timm's local-dir config.json for the student backbone."""
    s = meta["student"]
    size = s["img_size"]
    # num_classes lives at the root (timm and transformers both read it there), never in model_args
    model_args = {k: v for k, v in s["model_args"].items() if k != "num_classes"}
    return {
        "architecture": s["model_name"],
        "num_classes": 0,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "mean": s["mean"],
            "std": s["std"],
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "num_classes": 0,
            "fixed_input_size": False,
        },
        "unitower": {
            "summary_names": s["summary_names"],
            "num_registers": s["num_registers"],
            "teachers": meta["teachers"],
        },
    }


def export_student(ckpt: str | Path, out: str | Path, with_adaptors: bool = False) -> Path:
    """Write the student backbone (and optionally the adaptor heads) from `ckpt` into folder `out`."""
    checkpoint = load_checkpoint(ckpt)
    meta, state = checkpoint["unitower"], checkpoint["state_dict"]
    out = Path(out)
    backbone = {k.removeprefix("student.model."): v for k, v in state.items() if k.startswith("student.model.")}
    if not backbone:
        raise ValueError(f"{ckpt} holds no 'student.model.*' weights.")
    save_safetensors(backbone, out / "model.safetensors")
    if with_adaptors:
        heads = {k.removeprefix("heads."): v for k, v in state.items() if k.startswith("heads.")}
        norms = {k: v for k, v in state.items() if k.startswith("dense_norm.")}
        if meta["dense_loss"] == "mse" and not norms:
            raise ValueError(f"{ckpt}: dense_loss=mse but the checkpoint holds no 'dense_norm.*' statistics to export.")
        save_safetensors({**heads, **norms}, out / "adaptors.safetensors")
        save_json(
            {"dense_loss": meta["dense_loss"], "dense_norm": meta.get("dense_norm"), "heads": meta["heads"]},
            out / "adaptors.json",
        )
    # config.json last: a folder with a config is a complete export.
    save_json(timm_config(meta), out / "config.json")
    return out
