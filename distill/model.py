"""The distilled student as one plain nn.Module (AM-RADIO style): input conditioner + timm ViT backbone +
per-teacher adaptor heads (each owning the fixed feature normalizer of the mse loss).

Used for training (distill/module.py wraps it), export (`export`), inference (distill/exported.py,
mllm/towers.py StudentTower): the token layout, the normalization and the heads exist only here.

Token layout: the summary tokens are timm's own prefix tokens (the class token followed by register
tokens), so the backbone is a plain timm VisionTransformer that `timm.create_model('local-dir:DIR')` rebuilds
from an export without this project. Prefix token i (i < len(summary_names)) is the summary token of
teacher summary_names[i]; the remaining prefix tokens are registers.

    model = StudentModel("vit_small_patch16_224", summary_names=["clip", "dino"], num_registers=4)
    model.add_adaptor("clip", summary_dim=512, dense_dim=768)     # (DistillModule adds one per teacher)
    out = model(images)             # images in [0, 1], any size divisible by the patch size
    out.summary["clip"]             # backbone summary token of teacher clip [B, C]
    out.dense                       # backbone patch map [B, C, h, w]
    out.tokens                      # the raw tokens read [B, prefix + h*w, C] (final, or block `layer`)
    out.adaptors["clip"]            # AdaptorOutput(summary [B, 512], dense [B, 768, h, w])
    model.export("exports/toy")     # timm save_for_hf (config.json + model.safetensors) + adaptors.*
    StudentModel(..., cpe_max_grid=16)   # cropped position embedding (distill/cpe.py): any resolution
    model = StudentModel.from_export("exports/toy", adaptors=["clip"])
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from timm.models import save_for_hf
from torch import nn

from distill.cpe import enable_cpe, window_pos_embed
from distill.encoders.base import check_images
from distill.encoders.resize import normalize
from distill.heads import AdaptorHead
from distill.common.io import save_json, save_safetensors
from distill.common.names import resolve_path

ADAPTORS_WEIGHTS, ADAPTORS_CONFIG = "adaptors.safetensors", "adaptors.json"
CPE_WEIGHTS = "cpe_pos_embed.safetensors"  # the whole CPE position grid of an export (model.safetensors has a window)


@dataclass
class AdaptorOutput:
    """One teacher's predictions: summary [B, C_t] (None without a summary) and dense [B, C_t, h, w]."""

    summary: torch.Tensor | None
    dense: torch.Tensor


@dataclass
class StudentOutput:
    """Backbone summary tokens {teacher: [B, C]}, the dense patch map [B, C, h, w], the raw tokens read
    [B, prefix + h*w, C] and the adaptor predictions {teacher: AdaptorOutput}."""

    summary: dict[str, torch.Tensor]
    dense: torch.Tensor
    tokens: torch.Tensor
    adaptors: dict[str, AdaptorOutput]


class InputConditioner(nn.Module):
    """Images in [0, 1] -> (images - mean) / std per channel (RADIO's input conditioner).

    Args:
        mean: per-channel mean.
        std: per-channel std.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.mean, self.std)


class StudentModel(nn.Module):
    """A timm ViT student with per-teacher summary tokens, dynamic image size and per-teacher adaptor heads.

    Args:
        model_name: any timm ViT architecture name (e.g. ``vit_base_patch16_224``), or ``local-dir:FOLDER``
            of an export (use `from_export`).
        summary_names: the teachers that have a summary (CLS / image embedding), in order; each gets
            its own prefix token. Must match the teachers configured in the distillation module.
        num_registers: extra register tokens (Darcet et al.) beyond the summary tokens.
        img_size: the resolution the position embedding is created for; other sizes are interpolated.
        pretrained: start from timm's pretrained weights for ``model_name`` (needs a download or a
            ``checkpoint``).
        checkpoint: local weights file for ``model_name`` (loaded through timm's pretrained_cfg_overlay).
        mean: per-channel normalization mean applied to [0, 1] inputs.
        std: per-channel normalization std applied to [0, 1] inputs.
        model_args: extra keyword arguments for ``timm.create_model`` (e.g. ``embed_dim``, ``depth``,
            ``num_heads``, ``patch_size`` for a custom small ViT).
        cpe_max_grid: None (default): timm's position embedding for ``img_size``, resampled to other sizes.
            An int G: cropped position embedding (AM-RADIO's CPE, distill/cpe.py): the position embedding is
            a G x G patch grid; training adds a random window of it the size of the image's patch grid (one
            offset per sample, torch's global RNG), eval the centre window (grids beyond G: the resampled
            grid). G must be at least img_size / patch size. The export's model.safetensors holds the
            centre window at ``img_size`` (plain timm computes the same features there) and
            cpe_pos_embed.safetensors the whole grid (`from_export` restores CPE).
    """

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224",
        summary_names: list[str] | None = None,
        num_registers: int = 0,
        img_size: int = 224,
        pretrained: bool = False,
        checkpoint: str | None = None,
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        model_args: dict | None = None,
        cpe_max_grid: int | None = None,
    ) -> None:
        super().__init__()
        self.summary_names = list(summary_names or [])
        self.num_registers = num_registers
        num_prefix = max(1, len(self.summary_names) + num_registers)
        # Everything needed to rebuild the backbone with plain timm (written into the export).
        self.model_args = {k: v for k, v in (model_args or {}).items() if k != "num_classes"}
        self.model_args.update(
            img_size=img_size, class_token=True, reg_tokens=num_prefix - 1, dynamic_img_size=True, num_classes=0
        )
        if checkpoint is not None:
            checkpoint = str(resolve_path(checkpoint))
        overlay = {"file": checkpoint} if checkpoint else None
        try:
            self.model = timm.create_model(
                model_name, pretrained=pretrained or checkpoint is not None, pretrained_cfg_overlay=overlay, **self.model_args
            )
        except RuntimeError as err:
            if "Unknown model" in str(err):
                close = timm.list_models(f"*{model_name.split('_')[0]}*")[:10]
                raise ValueError(f"Unknown timm student model {model_name!r}; similar names: {close}") from err
            raise
        if not hasattr(self.model, "forward_intermediates") or not hasattr(self.model, "num_prefix_tokens"):
            raise ValueError(f"Student {model_name!r} is not a timm ViT with forward_intermediates/num_prefix_tokens.")
        self.model_name: str = self.model.pretrained_cfg.get("architecture", model_name)
        self.conditioner = InputConditioner(mean, std)
        self.heads = nn.ModuleDict()
        self.embed_dim: int = self.model.embed_dim
        self.patch_size: int = self.model.patch_embed.patch_size[0]
        self.img_size = img_size
        self.cpe_max_grid = cpe_max_grid
        if cpe_max_grid is not None:
            default_grid = max(self.model.patch_embed.grid_size)
            if cpe_max_grid < default_grid:
                raise ValueError(
                    f"cpe_max_grid={cpe_max_grid} is smaller than the default patch grid {default_grid} "
                    f"(img_size {img_size} / patch {self.patch_size}); set cpe_max_grid >= {default_grid}."
                )
            enable_cpe(self.model, cpe_max_grid, fresh=not (pretrained or checkpoint is not None))

    # ---- adaptors -------------------------------------------------------------------------------------
    def add_adaptor(
        self,
        name: str,
        summary_dim: int | None,
        dense_dim: int,
        hidden_dim: int = 1024,
        num_layers: int = 2,
        normalizer: str | None = None,
    ) -> AdaptorHead:
        """Add teacher `name`'s adaptor head (see heads.AdaptorHead); teachers with a summary must be in summary_names."""
        if name in self.heads:
            raise ValueError(f"StudentModel already has an adaptor for teacher {name!r}.")
        if summary_dim and name not in self.summary_names:
            raise ValueError(
                f"Teacher {name!r} has a summary but is not in summary_names {self.summary_names}; add it there."
            )
        self.heads[name] = AdaptorHead(self.embed_dim, summary_dim, dense_dim, hidden_dim, num_layers, normalizer)
        return self.heads[name]

    # ---- forward --------------------------------------------------------------------------------------
    def tokens(self, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """Raw tokens [B, prefix + h*w, C] of images in [0, 1]: the final normalized ones (layer -1) or the
        output of block `layer` (e.g. -2, before the final norm)."""
        check_images(images, "StudentModel")
        if images.shape[-1] % self.patch_size or images.shape[-2] % self.patch_size:
            raise ValueError(
                f"StudentModel input {tuple(images.shape[-2:])} is not divisible by patch size {self.patch_size}; "
                "resize or crop the images (the data module's image_size) to a multiple of it."
            )
        pixels = self.conditioner(images)
        if layer == -1:
            return self.model.forward_features(pixels)
        patches, prefix = self.model.forward_intermediates(
            pixels, indices=[layer], norm=False, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True,
            stop_early=True,
        )[0]
        return torch.cat([prefix, patches], dim=1)

    def split_tokens(
        self, tokens: torch.Tensor, image_hw: Sequence[int]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Tokens [B, prefix + h*w, C] -> ({teacher: summary token [B, C]}, dense map [B, C, h, w])."""
        h, w = image_hw[0] // self.patch_size, image_hw[1] // self.patch_size
        summary = {name: tokens[:, i] for i, name in enumerate(self.summary_names)}
        dense = tokens[:, self.model.num_prefix_tokens :].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        return summary, dense

    def forward(
        self,
        images: torch.Tensor,
        layer: int = -1,
        adaptors: Sequence[str] | None = None,
        teacher_space: bool = False,
    ) -> StudentOutput:
        """Backbone features and adaptor predictions for images in [0, 1].

        Args:
            images: [B, 3, H, W] in [0, 1], H and W multiples of the patch size.
            layer: the block whose tokens are read (-1: final normalized tokens); the heads read them too.
            adaptors: the teachers whose heads run (None: all).
            teacher_space: map dense predictions through each head's inverse normalizer (mse heads predict
                normalized features; True gives the teacher's own space).
        """
        tokens = self.tokens(images, layer)
        summary, dense = self.split_tokens(tokens, images.shape[-2:])
        preds = {}
        for name in self.heads if adaptors is None else adaptors:
            if name not in self.heads:
                raise KeyError(f"StudentModel has no adaptor for teacher {name!r}; available: {sorted(self.heads)}")
            head = self.heads[name]
            pred_summary, pred_dense = head(summary.get(name), dense)
            preds[name] = AdaptorOutput(pred_summary, head.to_teacher_space(pred_dense) if teacher_space else pred_dense)
        return StudentOutput(summary=summary, dense=dense, tokens=tokens, adaptors=preds)

    # ---- configuration and files ----------------------------------------------------------------------
    def config(self) -> dict:
        """The constructor arguments (as written into checkpoints) that rebuild this backbone."""
        return {
            "model_name": self.model_name,
            "model_args": dict(self.model_args),
            "summary_names": self.summary_names,
            "num_registers": self.num_registers,
            "mean": self.conditioner.mean,
            "std": self.conditioner.std,
            "img_size": self.img_size,
            "cpe_max_grid": self.cpe_max_grid,
        }

    def token_layout(self) -> dict:
        """How to read the backbone's tokens: prefix token i < len(summary_names) is teacher summary_names[i]."""
        layout = {
            "summary_names": self.summary_names,
            "num_registers": self.num_registers,
            "num_prefix_tokens": self.model.num_prefix_tokens,
            "patch_size": self.patch_size,
        }
        if self.cpe_max_grid is not None:
            layout["cpe_max_grid"] = self.cpe_max_grid
        return layout

    def plain_backbone(self) -> nn.Module:
        """The backbone as plain timm builds it from `model_args`: the model itself, or with CPE a copy whose
        pos_embed is the eval window at img_size (same features at img_size in eval mode)."""
        if self.cpe_max_grid is None:
            return self.model
        plain = timm.create_model(self.model_name, pretrained=False, **self.model_args)
        grid = self.model.patch_embed.grid_size
        state = {**self.model.state_dict(), "pos_embed": window_pos_embed(self.model, *grid).detach()}
        plain.load_state_dict(state)
        return plain.train(self.model.training)

    def adaptors_config(self) -> dict:
        """{teacher: head config}: the constructor arguments of `add_adaptor` for every head."""
        return {name: dict(head.config) for name, head in self.heads.items()}

    def export(self, out: str | Path, with_adaptors: bool = True, extra: dict | None = None) -> Path:
        """Write the backbone with timm's `save_for_hf` (config.json + model.safetensors, loadable by
        `timm.create_model('local-dir:OUT')` and transformers' TimmWrapperModel / AutoModel) and, with
        `with_adaptors`, adaptors.safetensors (every head's state: "<teacher>.summary.*", "<teacher>.dense.*",
        "<teacher>.norm.*") + adaptors.json (head configs and the token layout). `extra` goes into
        config.json["unitower"] and adaptors.json. With CPE, model.safetensors holds the eval window at img_size
        and cpe_pos_embed.safetensors the whole grid. config.json is written last: a folder with one is complete."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        layout = {**self.token_layout(), **(extra or {})}
        if with_adaptors:
            save_safetensors(self.heads.state_dict(), out / ADAPTORS_WEIGHTS)
            save_json({**layout, "heads": self.adaptors_config()}, out / ADAPTORS_CONFIG)
        if self.cpe_max_grid is not None:
            save_safetensors({"pos_embed": self.model.pos_embed.detach()}, out / CPE_WEIGHTS)
        size = self.img_size
        data_config = {"input_size": (3, size, size), "mean": self.conditioner.mean, "std": self.conditioner.std,
                       "interpolation": "bicubic", "crop_pct": 1.0}
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
        try:
            save_for_hf(self.plain_backbone(), str(staging), model_config={"pretrained_cfg": {"tag": "unitower_student"}},
                        safe_serialization=True, data_config=data_config)
            config = json.loads((staging / "config.json").read_text())
            config["pretrained_cfg"].pop("license", None)  # the architecture's source weights' licence, not ours
            # transformers passes num_classes=0 itself: in model_args too it would get it twice
            config["model_args"].pop("num_classes", None)
            config["pretrained_cfg"]["fixed_input_size"] = False
            config["unitower"] = layout
            os.replace(staging / "model.safetensors", out / "model.safetensors")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        save_json(config, out / "config.json")
        return out

    @classmethod
    def from_export(cls, path: str | Path, adaptors: Sequence[str] | None = None) -> StudentModel:
        """Load an `export` folder: the backbone through timm's local-dir loader, and the heads of the teachers
        in `adaptors` (None: every head the export has, if any) from adaptors.safetensors."""
        folder = Path(path)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: {folder} is not a `python -m distill export` folder.")
        config = json.loads(config_file.read_text())
        layout, cfg = config.get("unitower", {}), config["pretrained_cfg"]
        model = cls(
            f"local-dir:{folder}",
            summary_names=layout.get("summary_names", []),
            num_registers=layout.get("num_registers", 0),
            img_size=cfg["input_size"][-1],
            pretrained=True,
            mean=cfg["mean"],
            std=cfg["std"],
            model_args=config.get("model_args", {}),
            cpe_max_grid=layout.get("cpe_max_grid"),
        )
        if model.cpe_max_grid is not None:
            grid_file = folder / CPE_WEIGHTS
            if not grid_file.is_file():
                raise FileNotFoundError(f"{grid_file} not found: {config_file} says cpe_max_grid but the grid is missing.")
            model.model.pos_embed.data.copy_(load_file(str(grid_file))["pos_embed"])
        heads_file = folder / ADAPTORS_CONFIG
        if (adaptors is None and not heads_file.is_file()) or (adaptors is not None and not adaptors):
            return model  # backbone only
        if not heads_file.is_file():
            raise FileNotFoundError(f"{heads_file} not found; export with `python -m distill export --with-adaptors`.")
        heads = json.loads(heads_file.read_text())
        legacy_norm = heads.get("dense_norm")  # exports before the heads owned their normalizer
        if heads.get("dense_loss") == "mse" and not legacy_norm and not any(
            "normalizer" in h for h in heads["heads"].values()
        ):
            raise ValueError(
                f"{heads_file}: dense_loss=mse but no 'dense_norm' statistics were exported (an export from before "
                "fixed statistics); re-export the checkpoint of a current `python -m distill fit` run."
            )
        names = list(heads["heads"]) if adaptors is None else list(adaptors)
        for name in names:
            if name not in heads["heads"]:
                raise KeyError(f"No adaptor for teacher {name!r} in {heads_file}; available: {sorted(heads['heads'])}")
            args = {k: v for k, v in heads["heads"][name].items() if k != "student_dim"}
            args.setdefault("normalizer", legacy_norm)
            model.add_adaptor(name, **args)
        weights = {_legacy_key(k): v for k, v in load_file(str(folder / ADAPTORS_WEIGHTS)).items()}
        model.heads.load_state_dict({k: v for k, v in weights.items() if k.split(".", 1)[0] in names})
        return model


def _legacy_key(key: str) -> str:
    """'dense_norm.<teacher>.<x>' (exports before the heads owned their normalizer) -> '<teacher>.norm.<x>'."""
    if key.startswith("dense_norm."):
        teacher, rest = key.removeprefix("dense_norm.").split(".", 1)
        return f"{teacher}.norm.{rest}"
    return key
