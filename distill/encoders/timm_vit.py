"""timm ViT (DINOv2, any timm VisionTransformer) as a unitower teacher.

    enc = TimmEncoder("vit_large_patch14_dinov2.lvd142m", checkpoint="/models/dinov2_l.pth").freeze()
    enc = TimmEncoder("local-dir:/models/dino")     # timm's folder format: config.json + model.safetensors
    enc = TimmEncoder("toy:dino")                   # toy world teacher
    out = enc(images)  # images [B,3,H,W] in [0,1]; out.summary = CLS [B,C] (None without one), out.dense [B,C,h,w]

Preprocessing reproduces timm's eval transform (resolve_model_data_config + transforms_imagenet_eval:
resize by crop_pct with the model's interpolation, center crop, normalize) with tensor ops. With
`crop_pct < 1` that transform shows the model only the image centre; a distillation teacher must see
the student's whole view, so DistillModule refuses such teachers unless `crop_pct: 1.0` is set.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config

from distill.encoders import resize as R
from distill.encoders.base import Encoder, EncoderOutput, check_images, maps_at_layers
from distill.encoders.paths import require_dir
from distill.common.io import load_weights
from distill.common.names import resolve_model_name, resolve_path
from distill.common.state_dicts import KeyDifferences, key_differences


class TimmEncoder(Encoder):
    """Wrapper of a timm VisionTransformer read through `forward_intermediates`.

    Args:
        model_name: timm model name ('vit_large_patch14_dinov2.lvd142m'), 'local-dir:DIR' (timm folder with
            config.json + model.safetensors), 'hf-hub:ORG/REPO', or 'toy:NAME' (toy world folder).
        checkpoint: local weight file (.pth/.bin/.safetensors) loaded by timm via
            pretrained_cfg_overlay=dict(file=checkpoint); 'toy:NAME' allowed. Implies pretrained.
        pretrained: load the weights named by `model_name` (hub / local-dir / timm cache) when no checkpoint.
        image_size: input size (square) to run at; None = the model's pretrained_cfg input size.
        layer: -1 = tokens after the final norm (summary = CLS); other ints = output of that block
            (python index, -2 = penultimate) without final norm, summary = CLS at that block.
        crop_pct: fraction of the (short-side resized) image the model sees, centre-cropped; None = the
            model's pretrained_cfg value (timm's eval transform), 1.0 = the whole image (needed when the
            features must line up with another model's view of the same image, e.g. as a distillation teacher).
    """

    def __init__(
        self,
        model_name: str,
        checkpoint: str | None = None,
        pretrained: bool = False,
        image_size: int | None = None,
        layer: int = -1,
        crop_pct: float | None = None,
    ) -> None:
        super().__init__()
        if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"TimmEncoder('{model_name}'): crop_pct={crop_pct} must be in (0, 1] (1.0 = whole image).")
        model_name = resolve_model_name(model_name)
        checkpoint = resolve_path(checkpoint)
        self.model = _create_timm(model_name, checkpoint, pretrained, image_size)
        args = {} if image_size is None else {"input_size": (3, image_size, image_size)}
        if crop_pct is not None:
            args["crop_pct"] = crop_pct
        self.data_config = resolve_data_config(args, model=self.model)
        self.model_name = model_name
        self.crop_pct: float = self.data_config.get("crop_pct") or 0.875  # timm's eval default when unset
        self.input_size = tuple(self.data_config["input_size"][-2:])
        num_blocks = len(self.model.blocks)
        if not -num_blocks <= layer < num_blocks:
            raise ValueError(f"TimmEncoder('{model_name}'): layer={layer} is outside its {num_blocks} blocks.")
        self.layer = layer
        self.patch_size = self.model.patch_embed.patch_size[0]
        self.dense_dim = self.model.embed_dim
        self.has_class_token = getattr(self.model, "cls_token", None) is not None
        self.summary_dim = self.model.embed_dim if self.has_class_token else None

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.data_config
        crop_pct = self.crop_pct
        crop_mode = cfg.get("crop_mode") or "center"
        interpolation = cfg.get("interpolation", "bilinear")
        scale_size = tuple(math.floor(s / crop_pct) for s in self.input_size)
        if crop_mode == "squash":
            images = R.resize(images, scale_size, interpolation)
        elif crop_mode == "center" and scale_size[0] == scale_size[1]:
            images = R.resize_shortest(images, scale_size[0], interpolation)
        else:
            raise NotImplementedError(
                f"TimmEncoder: crop_mode='{crop_mode}' with input size {self.input_size} is not reproduced yet; "
                "use a model whose data config has crop_mode 'center' (square) or 'squash'."
            )
        images = R.center_crop(images, self.input_size)
        return R.normalize(images, cfg["mean"], cfg["std"])

    def encode(self, pixels: torch.Tensor) -> EncoderOutput:
        final = self.layer == -1
        (dense, prefix), = self.model.forward_intermediates(
            pixels,
            indices=[self.layer],
            return_prefix_tokens=True,
            norm=final,  # final norm on the last block's tokens = forward_features output
            stop_early=True,
            output_fmt="NCHW",
            intermediates_only=True,
        )
        summary = prefix[:, 0] if self.has_class_token else None  # the class token comes first in timm ViTs
        return EncoderOutput(summary=summary, dense=dense)

    def dense_layers(self, images: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """Dense maps [B, C, h, w] at each of `layers` as `layer` reads them (-1 = tokens after the final norm,
        any other block without it), from ONE forward: the values of one forward per layer."""
        check_images(images, type(self).__name__)
        pixels = self.preprocess(images)
        return maps_at_layers(
            layers, len(self.model.blocks), f"TimmEncoder('{self.model_name}')",
            lambda blocks: self.model.forward_intermediates(
                pixels, indices=blocks, norm=False, stop_early=True, output_fmt="NCHW", intermediates_only=True),
            self.model.norm)


def _create_timm(model_name: str, checkpoint: str | None, pretrained: bool, image_size: int | None) -> torch.nn.Module:
    """timm.create_model with errors that say which name / file is wrong and what to do."""
    source, identifier = timm.models.parse_model_name(model_name)
    what = f"TimmEncoder('{model_name}')"
    if source is None:
        architecture = identifier.split(".")[0]
        if not timm.is_model(architecture):
            close = difflib.get_close_matches(architecture, timm.list_models(), n=5, cutoff=0.5)
            raise ValueError(
                f"{what}: unknown timm model name. Close names: {close}. See timm.list_models(), "
                "or pass 'local-dir:DIR' for a folder with config.json + model.safetensors."
            )
    elif source == "local-dir":
        require_dir(identifier, what)
    kwargs: dict = {"dynamic_img_size": True}  # any input size; pos embeds are interpolated by timm
    if image_size is not None:
        kwargs["img_size"] = image_size
    if checkpoint is not None:
        # Read by the safe loader, handed to timm as a state dict (timm still applies its checkpoint filter and
        # strict load); source="timm" so a local-dir / hub name's own weights do not take precedence.
        state = load_weights(checkpoint, what)
        kwargs["pretrained_cfg_overlay"] = dict(source="timm", file=None, state_dict=state)
        pretrained = True
    elif source == "local-dir":
        pretrained = True  # the folder's weights are the point of a local-dir name
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except RuntimeError as error:
        if not pretrained:
            raise
        # timm's checkpoint filters fail in varied ways on foreign weights; name the keys that differ as a hint
        weights = checkpoint or _weights_in_dir(identifier)
        differences = _key_differences(model_name, weights, {k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"})
        if differences is not None and not any(differences):
            raise ValueError(f"{what}: the weights in '{weights}' match the architecture (same keys and shapes), "
                             f"but timm failed to load them. Library message: {error}") from error
        hint = "" if differences is None else (
            "Compared with a fresh model the file has {} missing keys (e.g. {}), {} unexpected keys (e.g. {}), "
            "{} keys of another shape (e.g. {}). ".format(*(x for keys in differences for x in (len(keys), keys[:5]))))
        raise ValueError(
            f"{what}: the weights in '{weights}' do not fit the architecture (check the model name / config "
            f"matches the checkpoint). {hint}Library message: {error}"
        ) from error


def _weights_in_dir(folder: str) -> str:
    for name in ("model.safetensors", "pytorch_model.bin"):  # the names timm's local-dir loader looks for
        if (Path(folder) / name).is_file():
            return str(Path(folder) / name)
    return folder


def _key_differences(model_name: str, weights: str, kwargs: dict) -> KeyDifferences | None:
    """(missing, unexpected, misshapen) keys of the raw file compared with a fresh model; None if unknown."""
    try:
        state = load_weights(weights, "TimmEncoder")
        expected = timm.create_model(model_name, pretrained=False, **kwargs).state_dict()
    except Exception:  # the hint is best effort; the main error is raised by the caller
        return None
    return key_differences(expected, state)
