"""Use an exported student (``python -m distill export``) as an Encoder, e.g. as a LLaVA vision tower.

    enc = StudentEncoder("exports/toy")                       # backbone features
    enc = StudentEncoder("exports/toy", adaptors=["clip"])    # features in CLIP's space (needs --with-adaptors;
                                                              # mse exports map back with their fixed statistics)
    out = enc(images)                                         # EncoderOutput(summary, dense)

The backbone is loaded with plain timm (`create_model('local-dir:...')`), exactly as other tools do.
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from distill.encoders.base import Encoder, EncoderOutput
from distill.feature_norm import build_normalizer
from distill.heads import AdaptorHead


class StudentEncoder(Encoder):
    """An exported distilled student behind the Encoder contract.

    Args:
        path: the export folder (config.json + model.safetensors [+ adaptors.*]).
        layer: -1 for the final normalized tokens; another block index (e.g. -2) for that block's output.
        adaptors: teacher names whose adaptor outputs replace the backbone features (dense maps are
            concatenated along channels; the summary is the first named teacher's adaptor summary).
            None uses the backbone: summary = the first summary token.
        image_size: resolution the student runs at (default: the export's img_size).
    """

    def __init__(self, path: str, layer: int = -1, adaptors: list[str] | None = None, image_size: int | None = None) -> None:
        super().__init__()
        folder = Path(path)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: {folder} is not a `python -m distill export` folder.")
        config = json.loads(config_file.read_text())
        self.meta = config.get("unitower", {})
        self.model = timm.create_model(f"local-dir:{folder}", pretrained=True)
        cfg = config["pretrained_cfg"]
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        size = image_size or cfg["input_size"][-1]
        self.input_size = (size, size)
        self.patch_size = self.model.patch_embed.patch_size[0]
        self.layer = layer
        self.adaptor_names = list(adaptors or [])
        self.heads = nn.ModuleDict()
        self.dense_norm = nn.ModuleDict()  # dense_loss=mse: maps the heads' standardized output to the teacher's space
        if self.adaptor_names:
            self._load_heads(folder)
        width = self.model.embed_dim
        if self.adaptor_names:
            dims = [self.heads[n].config for n in self.adaptor_names]
            self.dense_dim = sum(d["dense_dim"] for d in dims)
            self.summary_dim = dims[0]["summary_dim"]
        else:
            self.dense_dim = width
            self.summary_dim = width

    def _load_heads(self, folder: Path) -> None:
        config_file = folder / "adaptors.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found; export with `python -m distill export --with-adaptors`.")
        config = json.loads(config_file.read_text())
        norm_kind = config.get("dense_norm")
        if config["dense_loss"] == "mse" and norm_kind is None:
            raise ValueError(
                f"{config_file}: dense_loss=mse but no 'dense_norm' statistics were exported (an export from before "
                "fixed statistics); re-export the checkpoint of a current `python -m distill fit` run."
            )
        weights = load_file(str(folder / "adaptors.safetensors"))
        for name in self.adaptor_names:
            if name not in config["heads"]:
                raise KeyError(f"No adaptor for teacher {name!r} in {config_file}; available: {sorted(config['heads'])}")
            head = AdaptorHead(**config["heads"][name])
            prefix = f"{name}."
            head.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
            self.heads[name] = head
            if norm_kind is not None:
                norm = build_normalizer(norm_kind, head.config["dense_dim"])
                prefix = f"dense_norm.{name}."
                norm.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
                self.dense_norm[name] = norm

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        size = self.input_size[0]
        if (h, w) != (size, size):
            scale = size / min(h, w)
            new_hw = (max(size, round(h * scale)), max(size, round(w * scale)))
            images = F.interpolate(images, size=new_hw, mode="bicubic", antialias=True, align_corners=False)
            top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
            images = images[..., top : top + size, left : left + size]
        return (images - self.mean) / self.std

    def encode(self, pixels: torch.Tensor) -> EncoderOutput:
        h, w = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        prefix = self.model.num_prefix_tokens
        if self.layer == -1:
            tokens = self.model.forward_features(pixels)
        else:
            tokens = self.model.forward_intermediates(
                pixels, indices=[self.layer], norm=False, output_fmt="NLC", intermediates_only=True,
                return_prefix_tokens=True,
            )[0]
            tokens = torch.cat([tokens[1], tokens[0]], dim=1)
        summary, dense = tokens[:, 0], tokens[:, prefix:].transpose(1, 2).reshape(len(tokens), -1, h, w)
        if not self.adaptor_names:
            return EncoderOutput(summary=summary, dense=dense)
        names = self.meta.get("summary_names", [])
        maps, first_summary = [], None
        for i, name in enumerate(self.adaptor_names):
            token = tokens[:, names.index(name)] if name in names else None
            pred_summary, pred_dense = self.heads[name](token, dense)
            if name in self.dense_norm:
                pred_dense = self.dense_norm[name].inverse(pred_dense)
            maps.append(pred_dense)
            if i == 0:
                first_summary = pred_summary
        return EncoderOutput(summary=first_summary, dense=torch.cat(maps, dim=1))
