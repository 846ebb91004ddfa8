"""scripts/bench_distill.py's pieces that are not timings: the cache report's images and output, options."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from distill.encoders.base import EncoderOutput
from distill.teacher import Teacher

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_distill.py"
spec = importlib.util.spec_from_file_location("bench_distill", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


class Fixed(torch.nn.Module):
    """A teacher encoder with a [C=6, 3x4] dense map and a 5-wide summary (or none)."""

    def __init__(self, summary: bool) -> None:
        super().__init__()
        self.summary_dim, self.dense_dim = (5 if summary else None), 6

    def freeze(self):
        return self

    def forward(self, images):
        b = len(images)
        return EncoderOutput(summary=torch.ones(b, 5) if self.summary_dim else None, dense=torch.ones(b, 6, 3, 4))


class PixelLinear(torch.nn.Module):
    """A teacher whose dense map [B, 64, 16, 16] is a fixed linear map of 16x16-pooled pixels (rank 3 per token),
    so a PCA codec reconstructs it almost exactly; summary = the map's mean (64 wide)."""

    def __init__(self) -> None:
        super().__init__()
        self.summary_dim, self.dense_dim = 64, 64
        self.proj = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))

    def freeze(self):
        return self

    def forward(self, images):
        pooled = torch.nn.functional.adaptive_avg_pool2d(images, 16)  # [B, 3, 16, 16]
        dense = torch.einsum("oc,bchw->bohw", self.proj, pooled)
        return EncoderOutput(summary=dense.mean((2, 3)), dense=dense)


def test_cache_images_are_the_toy_worlds_held_out_images():
    from distill.toy.world import HELDOUT_SEED, ToyWorld

    images = bench.cache_images(3, 32)
    assert images.shape == (3, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    first = torch.tensor(list(ToyWorld(seed=HELDOUT_SEED, image_size=32)[0].image.getdata()), dtype=torch.float32)
    assert torch.equal(images[0].flatten(1).T * 255, first)


def test_cache_section_prints_bytes_ratio_and_cosine(capsys):
    teachers = [Teacher("a", PixelLinear(), precision="fp32")]
    bench.cache_section(8, teachers, 32)
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("cache a:"))
    assert "token cos mean" in line and float(line.split("token cos mean ")[1].split()[0]) > 0.99
    assert "cache total:" in out
    bench.cache_section(0, teachers, 32)
    assert "skipped" in capsys.readouterr().out


def test_quick_options():
    quick = bench.parse(["--quick"])
    assert (quick.size, quick.teacher_size, quick.batch, quick.reps, quick.sam_size, quick.cache_images) == (96, 112, 1, 2, 256, 8)
    full = bench.parse(["--batch", "8"])
    assert (full.size, full.teacher_size, full.batch, full.reps, full.sam_size) == (224, 224, 8, 5, 1024)


def test_students_section_times_both_ways(capsys, monkeypatch):
    """--students: the section builds one module with every student and one module per student, times both steps
    interleaved and prints the ratio (tiny timm students and teachers, 1 rep)."""
    import tiny_teachers  # noqa: F401  registers the tiny timm ViTs

    monkeypatch.setattr(bench, "OpenClipEncoder", lambda name, image_size: bench.TimmEncoder(
        "unitower_tiny_vit", image_size=image_size, crop_pct=1.0))
    args = bench.parse(["--students", "unitower_tiny_vit", "unitower_tiny_vit", "--clip", "x", "--dino",
                        "unitower_tiny_vit", "--size", "32", "--teacher-size", "32", "--batch", "1", "--reps", "1",
                        "--adaptor-hidden", "8"])
    assert args.students == ["unitower_tiny_vit", "unitower_tiny_vit"]
    bench.multi_student_section(args, torch.rand(1, 3, 32, 32))
    out = capsys.readouterr().out
    assert "one_teacher_pass" in out and "separate_runs" in out and "2 students in one run / 2 runs" in out
