"""The common layer: the one schedule (its three warmup shapes), the one name resolver, the one state-dict
checker and the folder writer, against hand-computed values."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from distill.common import names
from distill.common.io import remove_stale_temps, write_dir
from distill.common.schedule import warmup_cosine, warmup_cosine_factor
from distill.common.state_dicts import check_state_dict, key_differences


def test_schedule_shapes_by_hand():
    # "cap" (toy teachers): warmup 10 of 100 steps; the ramp is below the cosine early, the cosine later
    assert warmup_cosine_factor(0, 10, 100, warmup="cap") == pytest.approx(0.1)
    assert warmup_cosine_factor(50, 10, 100, warmup="cap") == pytest.approx(0.5)  # cos(pi/2) half-way over ALL steps
    assert warmup_cosine_factor(100, 10, 100, warmup="cap") == pytest.approx(0.0)
    # "scale" (toy LM): warmup 5 of 100, product of ramp and cosine over all steps
    assert warmup_cosine_factor(1, 5, 100, warmup="scale") == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 0.01)))
    assert warmup_cosine_factor(50, 5, 100, warmup="scale") == pytest.approx(0.5)
    # "then" (default): the cosine starts after the warmup
    assert warmup_cosine_factor(55, 10, 100) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="warmup='linear' is unknown"):
        warmup_cosine_factor(0, 1, 2, warmup="linear")


def test_warmup_cosine_steps_the_optimizer_lr():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = warmup_cosine(optimizer, 4, 20, warmup="cap")
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([2.0 * min((s + 1) / 4, 0.5 * (1 + math.cos(math.pi * s / 20))) for s in range(6)])


def test_resolver_uses_the_provider_table(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setitem(names.PROVIDERS, "toy", "tests_fake_provider:resolve")
    fake = type(os)("tests_fake_provider")
    fake.resolve = lambda name: calls.append(name) or tmp_path / name
    monkeypatch.setitem(__import__("sys").modules, "tests_fake_provider", fake)
    assert names.resolve_path("toy:sam") == str(tmp_path / "sam")
    assert names.resolve_model_name("toy:clip") == "local-dir:" + str(tmp_path / "clip")
    assert calls == ["sam", "clip"]
    for passthrough in ("local-dir:/m/dino", "hf-hub:org/repo", "/m/sam.pth", "ViT-B-16", None):
        assert names.resolve_path(passthrough) == passthrough
    assert names.resolve_model_name("hf-hub:org/repo") == "hf-hub:org/repo"
    assert names.split_scheme("local-dir:/m") == ("local-dir", "/m") and names.split_scheme("x") == (None, "x")


def test_key_differences_and_check():
    expected = {"a": torch.zeros(2), "b": torch.zeros(3), "tied": torch.zeros(1)}
    state = {"a": torch.zeros(2), "b": torch.zeros(4), "extra": torch.zeros(1)}
    assert key_differences(expected, state) == (["tied"], ["extra"], ["b: (4,) vs (3,)"])
    assert key_differences(expected, state, ignore={"tied", "extra"}) == ([], [], ["b: (4,) vs (3,)"])
    with pytest.raises(ValueError, match=r"w.pth' does not fit the architecture: 1 missing keys \(e.g. \['tied'\]\)"):
        check_state_dict(expected, state, "w.pth", "M")
    with pytest.raises(ValueError, match=r"wrong shape .*b: \(4,\) vs \(3,\)"):
        check_state_dict(expected, state, "w.pth", "M", ignore={"tied", "extra"})
    check_state_dict(expected, dict(expected), "w.pth", "M")


def test_write_dir_replaces_only_when_complete(tmp_path):
    out = tmp_path / "lm"
    write_dir(out, lambda folder: (folder / "a.txt").write_text("one"))
    assert (out / "a.txt").read_text() == "one"

    def fail(folder: Path) -> None:
        (folder / "b.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_dir(out, fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm"] and (out / "a.txt").read_text() == "one"
    write_dir(out, lambda folder: (folder / "b.txt").write_text("two"))
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm"]
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode
    assert remove_stale_temps(tmp_path) == []
