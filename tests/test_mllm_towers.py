"""Vision towers: output shapes of every kind, grids, CLS, fusion layouts, freezing (tests/test_mllm_towers.py)."""

import pytest
import torch

from distill.encoders import OpenClipEncoder, SamEncoder, TimmEncoder
from tiny_teachers import write_open_clip_dir, write_sam_state_dict, write_timm_dir
from mllm.towers import EnsembleTower, SingleEncoderTower, StudentTower, resample_grid


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("encoders")
    vit = TimmEncoder(f"local-dir:{write_timm_dir(tmp / 'vit')}", pretrained=True, layer=-2)  # 32 px, patch 8 -> 4x4
    clip = OpenClipEncoder(f"local-dir:{write_open_clip_dir(tmp / 'clip')}", layer=-2)
    sam = SamEncoder("tiny", checkpoint=str(write_sam_state_dict(tmp / "sam.pth")), layer=-1)
    return {"vit": vit, "clip": clip, "sam": sam, "vit_dir": tmp / "vit"}


IMAGES = torch.rand(2, 3, 40, 48)


def test_single_tower_shape_cls_and_grid(encoders):
    vit = encoders["vit"]
    out = vit(IMAGES)
    tower = SingleEncoderTower(vit)
    tokens = tower(IMAGES)
    h, w = out.dense.shape[-2:]
    assert tokens.shape == (2, h * w, vit.dense_dim) and tower.num_tokens == h * w and tower.dim == vit.dense_dim
    assert torch.allclose(tokens, out.dense.flatten(2).transpose(1, 2))  # row-major patch order
    with_cls = SingleEncoderTower(vit, keep_cls=True)(IMAGES)
    assert with_cls.shape[1] == h * w + 1 and torch.allclose(with_cls[:, 0], out.summary)
    pooled = SingleEncoderTower(vit, grid=2)
    assert pooled(IMAGES).shape == (2, 4, vit.dense_dim) and pooled.num_tokens == 4
    assert torch.allclose(pooled(IMAGES)[:, 0], out.dense[:, :, : h // 2, : w // 2].mean((2, 3)), atol=1e-5)


def test_sam_tower_and_keep_cls_error(encoders):
    sam = encoders["sam"]
    tower = SingleEncoderTower(sam, grid=4)
    assert tower(IMAGES).shape == (2, 16, sam.dense_dim)
    with pytest.raises(ValueError, match="keep_cls"):
        SingleEncoderTower(sam, keep_cls=True)


def test_frozen_tower_has_no_grad_and_stays_eval(encoders):
    tower = SingleEncoderTower(encoders["vit"])
    tower.train()
    assert not tower.encoder.training and not any(p.requires_grad for p in tower.parameters())
    tokens = tower(IMAGES)
    assert not tokens.requires_grad and not tokens.is_inference()  # usable as input of a trained projector
    trainable = SingleEncoderTower(TimmEncoder(f"local-dir:{encoders['vit_dir']}", pretrained=True), trainable=True)
    assert trainable(IMAGES).requires_grad


def test_ensemble_channel_fusion(encoders):
    parts = [encoders["vit"], encoders["clip"], encoders["sam"]]
    tower = EnsembleTower(parts, fusion="channel", grid=3)
    tokens = tower(IMAGES)
    assert tokens.shape == (2, 9, sum(e.dense_dim for e in parts)) and tower.dim == tokens.shape[-1]
    sam_block = tokens[..., -parts[2].dense_dim:]
    expected = resample_grid(parts[2](IMAGES).dense, (3, 3)).flatten(2).transpose(1, 2)
    assert torch.allclose(sam_block, expected, atol=1e-5)
    default_grid = EnsembleTower(parts)  # smallest grid among the encoders
    smallest = min(p(IMAGES).dense.shape[-1] for p in parts)
    assert default_grid.num_tokens == smallest * smallest


def test_ensemble_sequence_fusion_uses_channel_blocks(encoders):
    vit, clip = encoders["vit"], encoders["clip"]
    tower = EnsembleTower([vit, clip], fusion="sequence", grid=2)
    tokens = tower(IMAGES)
    assert tokens.shape == (2, 8, vit.dense_dim + clip.dense_dim)
    assert torch.all(tokens[:, :4, vit.dense_dim:] == 0) and torch.all(tokens[:, 4:, : vit.dense_dim] == 0)


def test_student_tower_on_an_export_folder(encoders):
    tower = StudentTower(str(encoders["vit_dir"]), grid=2)  # a timm local-dir folder, as `distill export` writes
    assert tower(IMAGES).shape == (2, 4, tower.dim)
