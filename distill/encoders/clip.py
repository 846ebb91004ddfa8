"""open_clip image tower (CLIP / SigLIP / any open_clip model) as a unitower teacher.

    enc = OpenClipEncoder("ViT-L-14-336", pretrained="openai").freeze()    # tag (online) or file path
    enc = OpenClipEncoder("local-dir:/models/clip")                         # open_clip's local folder format
    enc = OpenClipEncoder("toy:clip")                                       # toy world teacher
    save_open_clip_dir(model, "/models/clip", model_cfg, preprocess_cfg)   # write that local-dir format
    out = enc(images)  # images [B,3,H,W] in [0,1]; out.summary = encode_image, out.dense [B,width,h,w]

Preprocessing reproduces open_clip's eval transform with tensor ops, reading size / mean / std /
interpolation / resize_mode from the model's preprocess cfg.

OpenAI's CLIP weights were trained with QuickGELU, but open_clip builds nn.GELU for names without the
'-quickgelu' suffix (e.g. 'ViT-L-14-336'): `quick_gelu=None` picks QuickGELU whenever the weights are
recognisably OpenAI's (see `OpenClipEncoder`), and OpenAI weights with `quick_gelu=False` are refused.
"""

from __future__ import annotations

import difflib
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import open_clip
import torch
from open_clip.factory import parse_model_name
from open_clip.transformer import QuickGELU

from distill.encoders import resize as R
from distill.encoders.base import Encoder, EncoderOutput, check_images, maps_at_layers
from distill.encoders.mha_layout import use_seq_first_layout
from distill.encoders.paths import require_dir
from distill.common.io import load_weights, save_json, save_safetensors, weight_keys
from distill.common.names import resolve_model_name, resolve_path
from distill.common.state_dicts import describe_key_mismatch


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
        quick_gelu: MLP activation. True = QuickGELU (open_clip force_quick_gelu), False = nn.GELU,
            None = automatic: QuickGELU when the weights are OpenAI's -- a `pretrained` tag that open_clip
            marks quick_gelu (e.g. 'openai') or a state-dict file in the layout of OpenAI's TorchScript
            release (its extra 'input_resolution' / 'context_length' / 'vocab_size' entries) -- otherwise the
            model config's own setting ('-quickgelu' names, a local-dir config's "quick_gelu"). OpenAI
            weights with False raise ValueError; a GELU architecture whose only known weights are OpenAI's
            loaded from an unrecognised file warns.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        image_size: int | None = None,
        layer: int = -1,
        quick_gelu: bool | None = None,
    ) -> None:
        super().__init__()
        model_name = resolve_model_name(model_name)
        pretrained = resolve_path(pretrained)
        model = _create_open_clip(model_name, pretrained, image_size, quick_gelu)
        self.visual = model.visual
        use_seq_first_layout(self.visual)  # bf16 autocast on CPU: keep MultiheadAttention's in-projection fast
        self.model_name = model_name
        self._clip = (model,)  # a tuple, not a submodule: the text tower stays out of parameters / state dict
        self.quick_gelu = any(isinstance(m, QuickGELU) for m in self.visual.modules())
        self.preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
        size = self.preprocess_cfg["size"]
        self.input_size = (size, size) if isinstance(size, int) else tuple(size)
        self.layer = layer
        num_blocks = _num_blocks(self.visual)
        if not -num_blocks <= layer < num_blocks:
            raise ValueError(f"OpenClipEncoder('{model_name}'): layer={layer} is outside its {num_blocks} blocks.")
        self.patch_size, self.dense_dim, self.summary_dim = self._probe_dims()

    def clip_model(self) -> torch.nn.Module:
        """The whole open_clip model this image tower belongs to (`encode_text` for zero-shot probes). Not a
        submodule: its text tower is outside this encoder's parameters, state dict and `.to()`."""
        return self._clip[0]

    def tokenizer(self):
        """open_clip's tokenizer for this model (`open_clip.get_tokenizer` of its name)."""
        return open_clip.get_tokenizer(self.model_name)

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

    def dense_layers(self, images: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """Dense maps [B, C, h, w] at each of `layers` as `layer` reads them (-1 = the final patch tokens after
        ln_post, any other block without it), from ONE forward: the values of one forward per layer."""
        check_images(images, type(self).__name__)
        pixels = self.preprocess(images)
        return maps_at_layers(
            layers, _num_blocks(self.visual), f"OpenClipEncoder('{self.model_name}')",
            lambda blocks: self.visual.forward_intermediates(
                pixels, indices=blocks, stop_early=True, normalize_intermediates=False, intermediates_only=True,
                output_fmt="NCHW")["image_intermediates"],
            self.visual.ln_post)


def _num_blocks(visual: torch.nn.Module) -> int:
    if hasattr(visual, "transformer"):
        return len(visual.transformer.resblocks)
    return len(visual.trunk.blocks)  # open_clip TimmModel tower


def _has_class_token(visual: torch.nn.Module) -> bool:
    if hasattr(visual, "class_embedding"):
        return True
    return getattr(getattr(visual, "trunk", None), "cls_token", None) is not None


def _create_open_clip(
    model_name: str, pretrained: str | None, image_size: int | None, quick_gelu: bool | None = None
) -> torch.nn.Module:
    """open_clip.create_model with errors that say which name / file is wrong and what to do."""
    schema, identifier = parse_model_name(model_name)
    what = f"OpenClipEncoder('{model_name}')"
    is_file = schema is None and pretrained is not None and os.path.isfile(pretrained)
    if schema is None:
        known = open_clip.list_models()
        if identifier.replace("/", "-") not in known:
            close = difflib.get_close_matches(identifier, known, n=5, cutoff=0.5)
            raise ValueError(
                f"{what}: unknown open_clip model name. Close names: {close}. See open_clip.list_models(), "
                "or pass 'local-dir:DIR' for a folder with open_clip_config.json."
            )
        tags = open_clip.list_pretrained_tags_by_model(identifier)
        if pretrained is not None and pretrained not in tags and not is_file:
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
    kwargs.update(_activation_kwargs(schema, identifier, pretrained, is_file, quick_gelu, what))
    try:
        if is_file:
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


# Entries of OpenAI's TorchScript CLIP state dicts that are metadata, not weights (open_clip drops them too).
OPENAI_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def _activation_kwargs(
    schema: str | None, identifier: str, pretrained: str | None, is_file: bool, quick_gelu: bool | None, what: str
) -> dict:
    """open_clip.create_model kwargs that give the activation decided by `quick_gelu` (see OpenClipEncoder)."""
    openai = _openai_weights(identifier, pretrained, is_file, what) if schema is None and pretrained else None
    if quick_gelu is False and openai:
        raise ValueError(
            f"{what}: quick_gelu=False (nn.GELU) with {openai}, which was trained with QuickGELU: the features "
            "would be wrong. Set quick_gelu: true (or leave it unset), or use the '-quickgelu' model name."
        )
    if quick_gelu is None and openai:
        quick_gelu = True
    if quick_gelu is None and is_file and not _config_quick_gelu(identifier) and _only_quick_gelu_weights(identifier):
        warnings.warn(
            f"{what}: '{identifier}' builds nn.GELU, but the only pretrained weights open_clip knows for it "
            f"({open_clip.list_pretrained_tags_by_model(identifier)}) were trained with QuickGELU. If "
            f"'{pretrained}' holds those, set quick_gelu: true (or model_name '{identifier}-quickgelu'); "
            "set quick_gelu: false if the file was trained with GELU.",
            UserWarning,
            stacklevel=3,
        )
    if quick_gelu is True:
        return {"force_quick_gelu": True}
    if quick_gelu is False:
        return {"quick_gelu": False}  # open_clip applies extra kwargs over the model config
    return {}


def _openai_weights(identifier: str, pretrained: str, is_file: bool, what: str) -> str | None:
    """A description of why `pretrained` is OpenAI's QuickGELU weights, or None when nothing says so."""
    if not is_file:
        if open_clip.get_pretrained_cfg(identifier, pretrained).get("quick_gelu", False):
            return f"pretrained tag '{pretrained}'"
        return None
    if _is_torchscript_archive(pretrained):
        raise ValueError(
            f"{what}: '{pretrained}' is a TorchScript archive (OpenAI's own CLIP release), which cannot be read "
            "with torch.load(weights_only=True). Convert it once: torch.save(torch.jit.load(PATH, "
            "map_location='cpu').state_dict(), 'clip_openai.pt') and pass that file (QuickGELU is then picked "
            "automatically), or pass open_clip's state dict of the weights (e.g. hf timm/vit_large_patch14_clip_336.openai)."
        )
    if set(OPENAI_JIT_EXTRA_KEYS) <= weight_keys(pretrained):
        return f"'{pretrained}' (OpenAI TorchScript state-dict layout: {', '.join(OPENAI_JIT_EXTRA_KEYS)})"
    return None


def _is_torchscript_archive(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _config_quick_gelu(identifier: str) -> bool:
    return bool((open_clip.get_model_config(identifier) or {}).get("quick_gelu", False))


def _only_quick_gelu_weights(identifier: str) -> bool:
    """True when every pretrained tag open_clip lists for this architecture was trained with QuickGELU."""
    tags = open_clip.list_pretrained_tags_by_model(identifier)
    return bool(tags) and all(open_clip.get_pretrained_cfg(identifier, t).get("quick_gelu", False) for t in tags)


def _weights_file(folder: str) -> str:
    """The weight file open_clip reads from a local-dir folder (the folder itself if none is found)."""
    files = sorted(Path(folder).glob("*.safetensors")) + sorted(Path(folder).glob("*.bin")) + sorted(Path(folder).glob("*.pth"))
    return str(files[0]) if files else folder


def _load_file(model: torch.nn.Module, path: str, what: str) -> None:
    """open_clip.load_checkpoint (handles its key conversions) with a key-mismatch error that names keys."""
    incompatible = open_clip.load_checkpoint(model, path, strict=False, weights_only=True)
    unexpected = [k for k in incompatible.unexpected_keys if k not in OPENAI_JIT_EXTRA_KEYS]
    if incompatible.missing_keys or unexpected:
        raise ValueError(describe_key_mismatch(incompatible.missing_keys, unexpected, path, what))


def save_open_clip_dir(model: torch.nn.Module, folder: str | Path, model_cfg: dict, preprocess_cfg: dict) -> Path:
    """Write an open_clip CLIP in open_clip's local-dir format (open_clip_config.json with model_cfg and
    preprocess_cfg + open_clip_model.safetensors), atomically per file; load with 'local-dir:' + folder."""
    folder = Path(folder)
    save_safetensors(model.state_dict(), folder / "open_clip_model.safetensors")
    save_json({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, folder / "open_clip_config.json")
    return folder
