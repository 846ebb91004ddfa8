"""scripts/bench_distill.py's pieces that are not timings: Theia's layout bytes, the cache-report hook, options."""

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


CALLS = []


def fake_report(teachers, images):
    CALLS.append(([t.name for t in teachers], tuple(images.shape)))
    return {"bytes_per_image": 43, "cosine_a": 0.995}


def test_theia_bytes_and_cache_report_hook(capsys):
    teachers = [Teacher("a", Fixed(True), precision="fp32"), Teacher("b", Fixed(False), precision="fp32")]
    images = torch.rand(3, 3, 8, 8)
    assert bench.theia_bytes_per_image(teachers, images) == 2 * (6 * 3 * 4 + 5) + 2 * (6 * 3 * 4)
    bench.cache_report("test_bench_distill:fake_report", teachers, images)
    out = capsys.readouterr().out
    assert CALLS == [(["a", "b"], (3, 3, 8, 8))]
    assert "cosine_a: 0.995" in out and "cache / Theia bytes per image: 0.144" in out  # 43 / 298
    bench.cache_report(None, teachers, images)
    assert "not measured" in capsys.readouterr().out


def test_quick_options():
    quick = bench.parse(["--quick"])
    assert (quick.size, quick.teacher_size, quick.batch, quick.reps, quick.sam_size) == (96, 112, 1, 2, 256)
    full = bench.parse(["--batch", "8"])
    assert (full.size, full.teacher_size, full.batch, full.reps, full.sam_size) == (224, 224, 8, 5, 1024)
