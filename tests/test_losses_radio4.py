"""C-RADIOv4's loss options (distill/losses_radio4.py) against hand-computed values."""

import math

import pytest
import torch

from distill import losses_radio4 as r4


def test_translate_moves_pixels_and_fills_zeros():
    img = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    out = r4.translate(img, 1, 0)  # view pixel (y, x) = image (y + 1, x)
    assert torch.equal(out[0, 0], torch.tensor([[4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [0.0, 0.0, 0.0]]))
    out = r4.translate(img, 0, -1)
    assert torch.equal(out[0, 0], torch.tensor([[0.0, 1.0, 2.0], [0.0, 4.0, 5.0], [0.0, 7.0, 8.0]]))
    assert torch.equal(r4.translate(img, 0, 0), img)
    assert not r4.translate(img, 3, 0).any()


def test_aligned_overlap_recovers_the_same_image_cells():
    image = torch.randn(2, 5, 4, 4)  # a feature map that is exactly shift-equivariant: cell = image cell
    pred, target = r4.translate(image, 1, 0), r4.translate(image, 0, -1)
    p, t = r4.aligned_overlap(pred, target, (1, 0), (0, -1))
    # image cells seen by both: rows [max(0,1,0), min(4,5,4)) = 1..3, cols [max(0,0,-1), min(4,4,3)) = 0..2
    assert p.shape == t.shape == (2, 5, 3, 3)
    assert torch.equal(p, t)
    assert torch.equal(t, image[..., 1:4, 0:3])


def test_aligned_overlap_without_shift_is_the_whole_map_and_errors_name_the_fix():
    x, y = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    p, t = r4.aligned_overlap(x, y, (0, 0), (0, 0))
    assert torch.equal(p, x) and torch.equal(t, y)
    with pytest.raises(ValueError, match="no overlap.*shift_std"):
        r4.aligned_overlap(x, y, (2, 0), (-1, 0))
    with pytest.raises(ValueError, match="same grid"):
        r4.aligned_overlap(x, torch.randn(1, 2, 4, 4), (0, 0), (0, 0))


def test_fixed_pattern_noise_is_not_in_the_aligned_target():
    """A teacher = image content + a pattern tied to its grid positions: over shifts, the aligned targets of one
    image cell differ by the pattern (so a student cannot fit it), while the content part stays put."""
    content = torch.randn(1, 1, 6, 6)
    pattern = torch.randn(1, 1, 6, 6)
    seen = []
    for shift in (0, 1, 2):
        teacher = r4.translate(content, shift, 0) + pattern  # the pattern does not move with the image
        _, t = r4.aligned_overlap(torch.zeros_like(teacher), teacher, (0, 0), (shift, 0))
        cell = t[..., 2 - shift, 0].item()  # image cell (2, 0): the overlap starts at image row `shift`
        seen.append(cell)
        assert cell == pytest.approx(content[..., 2, 0].item() + pattern[..., 2 - shift, 0].item())
    assert len(set(round(v, 6) for v in seen)) == 3


def test_draw_shift_is_quantized_normal():
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([r4.draw_shift(g, 0.5) for _ in range(4000)], dtype=torch.float)
    assert set(draws.unique().tolist()) <= {-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0}
    # P(|N(0, 0.5)| < 0.5) = P(|Z| < 1) = 0.683
    assert (draws == 0).float().mean().item() == pytest.approx(0.683, abs=0.03)
    assert r4.draw_shift(g, 0.0) == (0, 0)


def test_angle_and_dispersion_hand_computed():
    assert r4.angle(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])).item() == pytest.approx(math.pi / 2)
    # (1,0) and (0,1): mean direction (1,1)/sqrt2, each pi/4 from it
    assert r4.angular_dispersion(torch.tensor([[1.0, 0.0], [0.0, 2.0]])).item() == pytest.approx(math.pi / 4)


def test_summary_angle_balanced_hand_computed():
    pred = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    target = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    # angles 0 and pi/2, dispersion pi/4: mean((0)^2, (2)^2) = 2
    assert r4.summary_angle_balanced(pred, target).item() == pytest.approx(2.0, rel=1e-5)
    assert r4.summary_angle_balanced(pred, target, torch.tensor(math.pi / 2)).item() == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("spread", [0.05, 0.5])
def test_angle_balanced_loss_is_the_same_for_narrow_and_wide_teachers(spread):
    """Targets at angles +-spread, predictions off by half the spread: the loss is (0.5)^2 for any spread, while
    the plain cosine loss shrinks with the spread (the imbalance the option removes)."""
    def unit(a):
        return torch.tensor([math.cos(a), math.sin(a)])
    target = torch.stack([unit(spread), unit(-spread)])
    pred = torch.stack([unit(1.5 * spread), unit(-1.5 * spread)])
    assert r4.summary_angle_balanced(pred, target).item() == pytest.approx(0.25, rel=1e-3)
    cosine = (1 - torch.nn.functional.cosine_similarity(pred, target)).mean().item()
    assert cosine == pytest.approx(1 - math.cos(0.5 * spread), rel=1e-3)


def test_summary_angle_balanced_gradient_is_finite_at_a_match():
    target = torch.randn(4, 8)
    pred = target.clone().requires_grad_(True)
    r4.summary_angle_balanced(pred, target).backward()
    assert torch.isfinite(pred.grad).all()
