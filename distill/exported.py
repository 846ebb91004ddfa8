"""Use an exported student (``python -m distill export``) as an Encoder, e.g. as a LLaVA vision tower.

    enc = StudentEncoder("exports/toy")                       # backbone features
    enc = StudentEncoder("exports/toy", adaptors=["clip"])    # features in CLIP's space (needs --with-adaptors;
                                                              # mse exports map back with their fixed statistics)
    out = enc(images)                                         # EncoderOutput(summary, dense)

The model is distill.model.StudentModel loaded with `StudentModel.from_export` (the backbone through plain
timm `create_model('local-dir:...')`, exactly as other tools do); this wrapper only adds the Encoder contract:
a short-side resize + centre crop to the export's resolution, and which features it returns.
"""

from __future__ import annotations

import torch

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
    """

    def __init__(self, path: str, layer: int = -1, adaptors: list[str] | None = None, image_size: int | None = None) -> None:
        super().__init__()
        self.adaptor_names = list(adaptors or [])
        self.student = StudentModel.from_export(path, adaptors=self.adaptor_names)
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
        out = self.student(pixels, layer=self.layer, adaptors=self.adaptor_names, teacher_space=True)
        if not self.adaptor_names:
            return EncoderOutput(summary=out.tokens[:, 0], dense=out.dense)
        first = out.adaptors[self.adaptor_names[0]]
        return EncoderOutput(summary=first.summary, dense=torch.cat([a.dense for a in out.adaptors.values()], dim=1))
