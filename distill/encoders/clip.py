"""open_clip image tower (CLIP / SigLIP / any open_clip model) as a unitower teacher.

    enc = OpenClipEncoder("ViT-L-14-336", pretrained="openai").freeze()    # tag (online) or file path
    enc = OpenClipEncoder("local-dir:/models/clip")                         # open_clip's local folder format
    enc = OpenClipEncoder("toy:clip")                                       # toy world teacher
    out = enc(images)  # images [B,3,H,W] in [0,1]; out.summary = encode_image, out.dense [B,width,h,w]

Preprocessing reproduces open_clip's eval transform with tensor ops, reading size / mean / std /
interpolation / resize_mode from the model's preprocess cfg.
"""

from __future__ import annotations

import difflib
import os
import pickle
from pathlib import Path

import open_clip
import torch
from open_clip.factory import parse_model_name

from distill.encoders import resize as R
from distill.encoders.base import Encoder, EncoderOutput
from distill.encoders.paths import describe_key_mismatch, require_dir, resolve_model_name, resolve_path
from distill.io import load_weights


class OpenClipEncoder(Encoder):
    """Wrapper of `open_clip.create_model(...).visual`.

    Args:
        model_name: open_clip model name ('ViT-L-14-336'), 'local-dir:DIR' (open_clip_config.json +
            weights), 'hf-hub:ORG/REPO', or 'toy:NAME' (toy world folder, loaded as local-dir).
        pretrained: weight tag ('openai', needs the download cache) or a local .pt/.bin/.safetensors
            state-dict file for `model_name`; ignored by open_clip for local-dir/hf-hub names; None = random init.
        image_size: override the model's input size (open_clip force_image_size); None = model default.
        layer: -1 = summary from encode_image (normalize=False) and dense = final patch tokens after
            ln_post; other ints = output of that transformer block (python index, -2 = penultimate),
            summary = its CLS token, no final norm.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        image_size: int | None = None,
        layer: int = -1,
    ) -> None:
        super().__init__()
        model_name = resolve_model_name(model_name)
        pretrained = resolve_path(pretrained)
        model = _create_open_clip(model_name, pretrained, image_size)
        self.visual = model.visual
        self.preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
        size = self.preprocess_cfg["size"]
        self.input_size = (size, size) if isinstance(size, int) else tuple(size)
        self.layer = layer
        num_blocks = _num_blocks(self.visual)
        if not -num_blocks <= layer < num_blocks:
            raise ValueError(f"OpenClipEncoder('{model_name}'): layer={layer} is outside its {num_blocks} blocks.")
        self.patch_size, self.dense_dim, self.summary_dim = self._probe_dims()

    @torch.no_grad()
    def _probe_dims(self) -> tuple[int, int, int | None]:
        """(patch_size, dense_dim, summary_dim) read from one forward at the input size."""
        training = self.visual.training
        self.visual.eval()
        out = self.encode(torch.zeros(1, 3, *self.input_size))
        self.visual.train(training)
        patch_size = self.input_size[0] // out.dense.shape[-2]
        return patch_size, out.dense.shape[1], None if out.summary is None else out.summary.shape[-1]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.preprocess_cfg
        mode = cfg.get("resize_mode", "shortest")
        interpolation = cfg.get("interpolation", "bicubic")
        if mode == "squash":
            images = R.resize(images, self.input_size, interpolation)
        elif mode == "shortest" and self.input_size[0] == self.input_size[1]:
            images = R.center_crop(R.resize_shortest(images, self.input_size[0], interpolation), self.input_size)
        else:
            raise NotImplementedError(
                f"OpenClipEncoder: preprocess resize_mode='{mode}' with size {self.input_size} is not reproduced "
                "yet; use a model whose preprocess cfg is 'shortest' (square) or 'squash'."
            )
        return R.normalize(images, cfg["mean"], cfg["std"])

    def encode(self, pixels: torch.Tensor) -> EncoderOutput:
        final = self.layer == -1
        out = self.visual.forward_intermediates(
            pixels,
            indices=[self.layer],
            stop_early=not final,
            normalize_intermediates=final,  # ln_post on the last block's tokens = final patch tokens
            intermediates_only=not final,
            output_fmt="NCHW",
            output_extra_tokens=True,
        )
        dense = out["image_intermediates"][0]
        if final:
            return EncoderOutput(summary=out["image_features"], dense=dense)
        prefix = out.get("image_intermediates_prefix")
        has_cls = prefix is not None and prefix[0].shape[1] > 0 and _has_class_token(self.visual)
        return EncoderOutput(summary=prefix[0][:, 0] if has_cls else None, dense=dense)


def _num_blocks(visual: torch.nn.Module) -> int:
    if hasattr(visual, "transformer"):
        return len(visual.transformer.resblocks)
    return len(visual.trunk.blocks)  # open_clip TimmModel tower


def _has_class_token(visual: torch.nn.Module) -> bool:
    if hasattr(visual, "class_embedding"):
        return True
    return getattr(getattr(visual, "trunk", None), "cls_token", None) is not None


def _create_open_clip(model_name: str, pretrained: str | None, image_size: int | None) -> torch.nn.Module:
    """open_clip.create_model with errors that say which name / file is wrong and what to do."""
    schema, identifier = parse_model_name(model_name)
    what = f"OpenClipEncoder('{model_name}')"
    if schema is None:
        known = open_clip.list_models()
        if identifier.replace("/", "-") not in known:
            close = difflib.get_close_matches(identifier, known, n=5, cutoff=0.5)
            raise ValueError(
                f"{what}: unknown open_clip model name. Close names: {close}. See open_clip.list_models(), "
                "or pass 'local-dir:DIR' for a folder with open_clip_config.json."
            )
        tags = open_clip.list_pretrained_tags_by_model(identifier)
        if pretrained is not None and pretrained not in tags and not os.path.isfile(pretrained):
            raise FileNotFoundError(
                f"{what}: pretrained='{pretrained}' is neither a local file nor a known tag (tags: {tags}). "
                "Pass the path of a state-dict file (.pt/.bin/.safetensors)."
            )
    elif pretrained is not None:
        raise ValueError(
            f"{what}: pretrained='{pretrained}' is ignored for '{schema}:' names (the folder / repo holds the "
            "weights). Drop `pretrained`, or use a registered model name with pretrained=FILE."
        )
    if schema == "local-dir":
        require_dir(identifier, what)
    kwargs = {} if image_size is None else {"force_image_size": image_size}
    try:
        if schema is None and pretrained is not None and os.path.isfile(pretrained):
            model = open_clip.create_model(identifier, pretrained=None, **kwargs)
            _load_file(model, pretrained, what)
            return model
        return open_clip.create_model(model_name, pretrained=pretrained, **kwargs)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:
        if "state_dict" not in str(error):  # not a key / shape mismatch: the safe loader names the problem
            file = _weights_file(identifier) if schema == "local-dir" else pretrained
            if file and os.path.isfile(file):
                load_weights(file, what)
            raise
        raise ValueError(
            f"{what}: the weights in '{identifier if schema else pretrained}' do not fit the architecture "
            f"(check the config / model name matches the checkpoint). Library message: {error}"
        ) from error


def _weights_file(folder: str) -> str:
    """The weight file open_clip reads from a local-dir folder (the folder itself if none is found)."""
    files = sorted(Path(folder).glob("*.safetensors")) + sorted(Path(folder).glob("*.bin")) + sorted(Path(folder).glob("*.pth"))
    return str(files[0]) if files else folder


def _load_file(model: torch.nn.Module, path: str, what: str) -> None:
    """open_clip.load_checkpoint (handles its key conversions) with a key-mismatch error that names keys."""
    incompatible = open_clip.load_checkpoint(model, path, strict=False, weights_only=True)
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise ValueError(describe_key_mismatch(incompatible.missing_keys, incompatible.unexpected_keys, path, what))
