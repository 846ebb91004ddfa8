"""The probes' controls: re-initialised towers (mllm/study/reinit.py) and raw-pixel tokens (mllm.features.pixel_tokens)."""

import pytest
import torch
from torch import nn

from llava_configs import timm_tower
from mllm.features import pixel_tokens
from mllm.study.reinit import reinit_weights
from tiny_teachers import write_timm_dir


class Tokens(nn.Module):
    """A tower-like module: a patch conv, a position embedding and a class token (no reset_parameters), a
    LayerNorm and segment_anything's LayerNorm2d (no reset_parameters either)."""

    def __init__(self) -> None:
        from segment_anything.modeling.common import LayerNorm2d

        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.norm2d = LayerNorm2d(8)
        self.pos_embed = nn.Parameter(torch.zeros(1, 400, 8))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 8)


def trained() -> Tokens:
    module = Tokens()
    with torch.no_grad():  # "training" moved every weight away from its initialisation
        for p in module.parameters():
            p.add_(torch.randn_like(p) + 3.0)
    return module


def test_reinit_changes_every_parameter_deterministically_and_keeps_shapes():
    before = {k: v.clone() for k, v in trained().state_dict().items()}
    first, second, other = trained(), trained(), trained()
    drawn = reinit_weights(first, seed=0)
    reinit_weights(second, seed=0)
    reinit_weights(other, seed=1)
    assert sorted(drawn) == ["cls_token", "pos_embed"]  # no reset_parameters and no norm: normal(0, 0.02)
    for name, value in first.state_dict().items():
        assert value.shape == before[name].shape
        assert not torch.allclose(value, before[name]), name
        assert torch.equal(value, second.state_dict()[name]), name  # the same seed, the same weights
    assert not torch.equal(first.head.weight, other.head.weight)
    for norm in (first.norm, first.norm2d):  # norms back to identity
        assert torch.equal(norm.weight, torch.ones(8)) and torch.equal(norm.bias, torch.zeros(8))
    assert first.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    assert abs(first.pos_embed.mean().item()) < 0.005


def test_reinit_leaves_the_global_rng_alone():
    module = trained()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    reinit_weights(module, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_reinitialised_tower_gives_tokens_of_the_same_shape(tmp_path):
    from mllm.study.common import build_tower

    config = timm_tower(write_timm_dir(tmp_path / "vit", reg_tokens=4))
    tower = build_tower(config).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        tokens = tower(images)
        reinit_weights(tower, seed=0)
        fresh = tower(images)
    assert fresh.shape == tokens.shape
    assert not torch.allclose(fresh, tokens)


def test_pixel_tokens_match_hand_computation():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) / 95.0  # values in [0, 1]
    tokens = pixel_tokens(images, grid=2)
    assert tokens.shape == (2, 4, 2 * 2 * 3 // 4)
    for n in range(2):
        for row in range(2):
            for col in range(2):
                flat = [images[n, ch, y, x].item() for y in (2 * row, 2 * row + 1) for x in (2 * col, 2 * col + 1)
                        for ch in range(3)]  # the cell's H*W*3 values, channel fastest
                assert tokens[n, row * 2 + col].tolist() == pytest.approx(flat[::4])
    assert 0.0 <= tokens.min() and tokens.max() <= 1.0
    with pytest.raises(ValueError, match="multiple of grid=3"):
        pixel_tokens(images, grid=3)
