"""The distilled student as an ONNX file (`unitower distill export --ckpt X.ckpt --out DIR --onnx [--with-adaptors]`
writes DIR/student.onnx beside the safetensors export).

    path = export_onnx(model, "exports/toy/student.onnx", with_adaptors=True)    # model: a StudentModel
    diffs = compare_onnx(model, path, [(64, 64), (80, 64)])   # {"64x64": max abs diff vs PyTorch, ...} (onnxruntime)

Input `images`: float32 [batch, 3, H, W] in [0, 1], exactly StudentModel's input (the normalization is in the
graph). Batch, H and W are dynamic; H and W must be multiples of the patch size (the backbone is built with
timm's dynamic_img_size). A CPE student (cpe_max_grid G) runs at up to G x G patches: the graph holds the eval
window of the grid (the resampling beyond G is not in it), so larger inputs are not valid for its file.
Outputs, named after StudentOutput's fields (final normalized tokens, as StudentModel with layer=-1):

    tokens                      [B, prefix + h*w, C]   timm forward_features (prefix i < len(summary_names): teacher i)
    dense                       [B, C, h, w]           the patch map
    summary.<teacher>           [B, C]                 the backbone summary token of each teacher in summary_names
    adaptors.<teacher>.summary  [B, C_t]               with adaptors, teachers with a summary: the head's prediction
    adaptors.<teacher>.dense    [B, C_t, h, w]         with adaptors: the dense prediction in the teacher's own space

The model's metadata (metadata_props) holds "unitower": the token layout, the output names and the valid input sides.

The exporter is torch's dynamo one (`torch.onnx.export(dynamo=True)`: torch.export + onnxscript): the TorchScript
exporter traces one image size and bakes the position-embedding resampling into the graph, whose results are
wrong or fail at any other H x W. It needs the `onnx` extra: pip install "unitower[onnx]" (onnx, onnxscript, and
onnxruntime for the check).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from distill.common.io import atomic_write
from distill.model import StudentModel

ONNX_FILE = "student.onnx"
EXPORT_PACKAGES = ("onnx", "onnxscript")  # what torch.onnx.export(dynamo=True) imports
INSTALL_HINT = 'pip install "unitower[onnx]"'


class OnnxStudent(nn.Module):
    """StudentModel with a flat tuple of tensors as output (ONNX has no dataclasses), in `output_names` order.

    Args:
        student: the StudentModel (eval mode; float32).
        with_adaptors: also return each adaptor head's predictions (dense in the teacher's space).
    """

    def __init__(self, student: StudentModel, with_adaptors: bool) -> None:
        super().__init__()
        self.student = student
        self.adaptor_names = list(student.heads) if with_adaptors else []

    def output_names(self) -> list[str]:
        names = ["tokens", "dense"] + [f"summary.{name}" for name in self.student.summary_names]
        for name in self.adaptor_names:
            if self.student.heads[name].summary is not None:
                names.append(f"adaptors.{name}.summary")
            names.append(f"adaptors.{name}.dense")
        return names

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.student(images, adaptors=self.adaptor_names, teacher_space=True)
        outputs = [out.tokens, out.dense] + [out.summary[name] for name in self.student.summary_names]
        for name in self.adaptor_names:
            if out.adaptors[name].summary is not None:
                outputs.append(out.adaptors[name].summary)
            outputs.append(out.adaptors[name].dense)
        return tuple(outputs)


def check_onnx_packages() -> None:
    """Raise ModuleNotFoundError (naming the missing packages and the install command) unless the exporter can run."""
    missing = [name for name in EXPORT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f"--onnx needs the packages {' and '.join(EXPORT_PACKAGES)} (missing: "
                                  f"{', '.join(missing)}); install them with {INSTALL_HINT}.", name=missing[0])


def max_patches(student: StudentModel) -> int | None:
    """The largest valid patch-grid side of the ONNX graph: cpe_max_grid for a CPE student, else None (any)."""
    return student.cpe_max_grid


def export_onnx(student: StudentModel, path: str | Path, with_adaptors: bool = False) -> Path:
    """Write `student` (backbone, and with `with_adaptors` every adaptor head) as ONNX to `path`, atomically
    (`student` is put in eval mode and float32 first: the file is the inference model).

    Raises ModuleNotFoundError without the exporter's packages and ValueError (what failed, what to do) when
    torch's exporter cannot convert the model."""
    check_onnx_packages()
    student = student.float().eval()
    wrapper = OnnxStudent(student, with_adaptors).eval()
    patch, size, top = student.patch_size, student.img_size, max_patches(student)
    grid = torch.export.Dim("h", min=1, max=top) if top else torch.export.Dim("h", min=1)
    grid_w = torch.export.Dim("w", min=1, max=top) if top else torch.export.Dim("w", min=1)
    shapes = {"images": {0: torch.export.Dim("batch", min=1), 2: patch * grid, 3: patch * grid_w}}
    example = torch.rand(2, 3, size, size)
    names = wrapper.output_names()
    try:
        with torch.no_grad():
            program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=["images"], output_names=names,
                                        dynamic_shapes=shapes, verbose=False, report=False)
    except Exception as error:  # the exporter raises many types (torch.export, onnxscript); all mean "unsupported"
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"ONNX export of student {student.model_name!r}{' with adaptors' if with_adaptors else ''} failed in "
            f"torch.onnx.export ({type(error).__name__}: {first[:300]}); the safetensors export is unaffected: use it, "
            "or rerun with --debug for the exporter's traceback."
        ) from error
    program.model.metadata_props["unitower"] = json.dumps({
        **student.token_layout(), "input": "images [batch, 3, H, W] float32 in [0, 1]; H, W multiples of patch_size",
        "max_patches": top, "img_size": size, "outputs": names,
    })
    return atomic_write(path, lambda tmp: program.save(tmp))


def compare_onnx(student: StudentModel, path: str | Path, sizes: Sequence[tuple[int, int]], batch: int = 2,
                 with_adaptors: bool = False, seed: int = 0) -> dict[str, float]:
    """{"HxW": the largest absolute difference over every output} between onnxruntime running `path` and `student`
    in PyTorch on the same random images at each (H, W) of `sizes`. Needs onnxruntime."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper = OnnxStudent(student.float().eval(), with_adaptors).eval()
    names = [o.name for o in session.get_outputs()]
    if names != wrapper.output_names():
        raise ValueError(f"{path} has outputs {names}, the student {wrapper.output_names()}: compare with "
                         "with_adaptors as exported.")
    generator = torch.Generator().manual_seed(seed)
    diffs = {}
    for height, width in sizes:
        images = torch.rand(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = wrapper(images)
        got = session.run(None, {"images": images.numpy()})
        diffs[f"{height}x{width}"] = max(float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected))
    return diffs


def check_sizes(student: StudentModel) -> list[tuple[int, int]]:
    """Two input sizes for `compare_onnx`: the export's img_size and a non-square one (2 patches taller, or
    shorter where a CPE grid ends at img_size)."""
    size, patch, top = student.img_size, student.patch_size, max_patches(student)
    taller = size + 2 * patch
    other = taller if top is None or taller <= top * patch else max(patch, size - 2 * patch)
    return [(size, size), (other, size)]
