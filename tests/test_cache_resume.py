"""Exact resume with a teacher cache: a fit on `data.teacher_cache` killed with SIGKILL mid-run and resumed
from its last checkpoint ends with weights bit-identical to an uninterrupted run, having trained on the
same (epoch, index) samples (the helpers and shrunk toy recipe of tests/test_resume.py)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_resume as tr  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_kill9_resume_with_teacher_cache_is_bit_identical(tmp_path, workers, monkeypatch):
    for key, value in tr._env().items():
        monkeypatch.setenv(key, value)
    from distill.cache.cli import main as cache_main

    cache = tmp_path / "cache"
    cache_main(["-c", str(tr.distill_config(tmp_path / "build", tmp_path / "unused.txt", 0)), "--out", str(cache),
                "--views", "2", "--workers", "0", "--calibration-images", "16"])

    def make(root: Path, ids: Path) -> Path:
        return tr.distill_config(root, ids, workers)

    extra = ("--data.teacher_cache", str(cache))
    ref_ids = tmp_path / "ref_ids.txt"
    tr._run(tr._command("distill", make(tmp_path / "ref", ref_ids), *extra))
    kill_step = random.randrange(tr.EVERY + 1, tr.STEPS - 1)
    killed_ids, resumed_ids = tmp_path / "killed_ids.txt", tmp_path / "resumed_ids.txt"
    tr._run_and_kill(tr._command("distill", make(tmp_path / "run", killed_ids), *extra), killed_ids, kill_step)
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    resumed_from = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    tr._run(tr._command("distill", make(tmp_path / "run", resumed_ids), *extra, "--ckpt_path", str(last)))

    expected, final = tr._weights(tmp_path / "ref" / "ckpt" / "last.ckpt"), tr._weights(last)
    diff = max((expected[k].float() - final[k].float()).abs().max().item() for k in expected)
    assert all(torch.equal(expected[k], final[k]) for k in expected), f"killed at {kill_step}: max abs diff {diff}"
    reference = tr._read_ids(ref_ids)
    trained = [(s, ids) for s, ids in tr._read_ids(killed_ids) if s < resumed_from] + tr._read_ids(resumed_ids)
    assert trained == reference and [s for s, _ in trained] == list(range(tr.STEPS))
    print(f"cache workers={workers}: killed at step {kill_step}, resumed from {resumed_from}, max abs diff {diff}")
