"""Distillation losses and the LR schedule against hand-computed values."""

import math

import pytest
import torch

from distill import losses
from distill.common.schedule import warmup_cosine_factor


def test_summary_cosine_hand_computed():
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    target = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    # cos = 0 and 1 -> mean(1 - cos) = (1 + 0) / 2
    assert losses.summary_cosine(pred, target).item() == pytest.approx(0.5)


def test_dense_cosine_smooth_l1_hand_computed():
    # B=1, C=2, 1x2 grid: position 0 pred (1,0) vs target (1,0); position 1 pred (0,1) vs (0,3)
    pred = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    target = torch.tensor([[[[1.0, 0.0]], [[0.0, 3.0]]]])
    # cos part: both positions cos = 1 -> 0; smooth-L1 (beta 1): elementwise diffs 0,0,0,2 -> 2 - 0.5 = 1.5 -> mean 0.375
    assert losses.dense_cosine_smooth_l1(pred, target, 0.9, 0.1).item() == pytest.approx(0.1 * 0.375)
    # orthogonal at every position: cos part = 1
    target2 = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]]]])
    # diffs: (1-0)=1,(0-1)=1 ; (0-1)=1,(1-0)=1 -> smooth_l1 each 0.5 -> mean 0.5
    assert losses.dense_cosine_smooth_l1(pred, target2, 0.9, 0.1).item() == pytest.approx(0.9 * 1 + 0.1 * 0.5)


def test_dense_mse_standardizes_target():
    target = torch.tensor([[[[3.0]], [[10.0]]]])  # B=1, C=2, 1x1
    mean, std = torch.tensor([1.0, 10.0]), torch.tensor([2.0, 5.0])
    pred = torch.tensor([[[[1.0]], [[0.0]]]])  # exactly the standardized target (1, 0)
    assert losses.dense_mse(pred, target, mean, std).item() == pytest.approx(0.0)
    assert losses.dense_mse(torch.zeros_like(pred), target, mean, std).item() == pytest.approx(0.5)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        losses.summary_cosine(torch.zeros(2, 3), torch.zeros(2, 4))


def test_resize_to_grid():
    dense = torch.arange(4.0).view(1, 1, 2, 2)
    assert losses.resize_to_grid(dense, (2, 2)) is dense
    up = losses.resize_to_grid(dense, (4, 4))
    assert up.shape == (1, 1, 4, 4) and up.mean().item() == pytest.approx(1.5)


def test_warmup_cosine_factor():
    assert warmup_cosine_factor(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine_factor(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine_factor(10, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine_factor(60, 10, 110, 0.0) == pytest.approx(0.5)
    assert warmup_cosine_factor(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(35, 10, 110, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
