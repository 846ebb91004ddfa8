"""Shared fixtures: tiny teacher checkpoints written in each library's native format."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # CI machines have 2 cores; keep test processes from oversubscribing them


@pytest.fixture(scope="session")
def tiny_teacher_files(tmp_path_factory) -> dict[str, Path]:
    """{clip: open_clip local-dir, dino: timm local-dir with 4 registers, sam: SAM 'tiny' state-dict .pth}."""
    import tiny_teachers as tiny

    root = tmp_path_factory.mktemp("teachers")
    return {
        "clip": tiny.write_open_clip_dir(root / "clip"),
        "dino": tiny.write_timm_dir(root / "dino", reg_tokens=4),
        "sam": tiny.write_sam_state_dict(root / "sam.pth"),
    }


@pytest.fixture(scope="module")
def smoke_world():
    """The smoke toy profile (few-step toy teachers + LM) for a test module's toy:clip / toy:dino / toy:sam /
    toy:lm names; the previous $UNITOWER_TOY_PROFILE comes back after the module."""
    before = os.environ.get("UNITOWER_TOY_PROFILE")
    os.environ["UNITOWER_TOY_PROFILE"] = "smoke"
    yield
    if before is None:
        os.environ.pop("UNITOWER_TOY_PROFILE", None)
    else:
        os.environ["UNITOWER_TOY_PROFILE"] = before
