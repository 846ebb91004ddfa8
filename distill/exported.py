"""Use an exported student (``python -m distill export``) as an Encoder, e.g. as a LLaVA vision tower.

    enc = StudentEncoder("exports/toy")                       # backbone features
    enc = StudentEncoder("exports/toy", adaptors=["clip"])    # features in CLIP's space (needs --with-adaptors;
                                                              # mse exports map back with their fixed statistics)
    out = enc(images)                                         # EncoderOutput(summary, dense)

As the teachers of a second distillation (a proxy teacher, EUPE-style: configs/distill/toy_proxy.yaml), one
StudentEncoder per adaptor with `share_backbone: true`: encoders of the same export share one loaded model, and a
batch that the previous call already ran (equal pixels) reuses its output, so the proxy's backbone runs once per
batch for all its teacher spaces.

The model is distill.model.StudentModel loaded with `StudentModel.from_export` (the backbone through plain
timm `create_model('local-dir:...')`, exactly as other tools do); this wrapper only adds the Encoder contract:
a short-side resize + centre crop to the export's resolution, and which features it returns.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from torch import nn

from distill.encoders.base import Encoder, EncoderOutput
from distill.encoders.resize import resize_center_crop
from distill.model import StudentModel


class StudentEncoder(Encoder):
    """An exported distilled student behind the Encoder contract.

    Args:
        path: the export folder (config.json + model.safetensors [+ adaptors.*]).
        layer: -1 for the final normalized tokens; another block index (e.g. -2) for that block's output.
        adaptors: teacher names whose adaptor outputs replace the backbone features (dense maps are
            concatenated along channels; the summary is the first named teacher's adaptor summary).
            None uses the backbone: summary = the first summary token.
        image_size: resolution the student runs at (default: the export's img_size).
        share_backbone: share one loaded model (with every adaptor) between the encoders of this export and layer,
            and reuse the previous call's output for the same pixels: several encoders of one export (one per
            adaptor, as teachers) then run its backbone once per batch. Needs adaptors.
    """

    def __init__(self, path: str, layer: int = -1, adaptors: list[str] | None = None, image_size: int | None = None,
                 share_backbone: bool = False) -> None:
        super().__init__()
        self.adaptor_names = list(adaptors or [])
        if share_backbone and not self.adaptor_names:
            raise ValueError(f"StudentEncoder({path!r}): share_backbone needs adaptors (the teacher spaces to read).")
        self.shared = SharedStudent.of(path, layer) if share_backbone else None
        self.student = self.shared.student if share_backbone else StudentModel.from_export(path, adaptors=self.adaptor_names)
        size = image_size or self.student.img_size
        self.input_size = (size, size)
        self.patch_size = self.student.patch_size
        self.layer = layer
        if self.adaptor_names:
            dims = [self.student.heads[n].config for n in self.adaptor_names]
            self.dense_dim = sum(d["dense_dim"] for d in dims)
            self.summary_dim = dims[0]["summary_dim"]
        else:
            self.dense_dim = self.summary_dim = self.student.embed_dim

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Short side to the input size (bicubic), then the central square; normalizing is the model's job."""
        return resize_center_crop(images, self.input_size[0], "bicubic")

    def encode(self, pixels: torch.Tensor) -> EncoderOutput:
        if self.shared is not None:
            out = self.shared(pixels)
        else:
            out = self.student(pixels, layer=self.layer, adaptors=self.adaptor_names, teacher_space=True)
        if not self.adaptor_names:
            return EncoderOutput(summary=out.tokens[:, 0], dense=out.dense)
        first = out.adaptors[self.adaptor_names[0]]
        return EncoderOutput(summary=first.summary, dense=torch.cat([out.adaptors[n].dense for n in self.adaptor_names], dim=1))


class SharedStudent(nn.Module):
    """One export's StudentModel with every adaptor, shared by the StudentEncoders that ask for it (`of`), remembering
    its last input and output: a call with equal pixels (the same batch for another teacher space) reuses the output.

    Args:
        path: the export folder (with adaptors).
        layer: the block whose tokens the heads read (-1: final normalized tokens).
    """

    _loaded: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def __init__(self, path: str, layer: int = -1) -> None:
        super().__init__()
        self.student = StudentModel.from_export(path, adaptors=None)
        self.layer = layer
        self._last: tuple[torch.Tensor, object] | None = None

    @classmethod
    def of(cls, path: str, layer: int = -1) -> SharedStudent:
        """The shared model of export `path` read at `layer` (loaded once while any encoder holds it)."""
        key = (str(Path(path).resolve()), layer)
        shared = cls._loaded.get(key)
        if shared is None:
            shared = cls._loaded[key] = cls(path, layer)
        return shared

    def forward(self, pixels: torch.Tensor):
        """The StudentOutput of every adaptor, in the teachers' spaces."""
        last = self._last
        if last is not None and last[0].shape == pixels.shape and last[0].device == pixels.device and torch.equal(last[0], pixels):
            return last[1]
        out = self.student(pixels, layer=self.layer, teacher_space=True)
        self._last = (pixels, out)
        return out
