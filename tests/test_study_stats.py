"""Study statistics against hand-computable cases: bootstrap CIs, paired differences, Holm, TOST, probes."""

import numpy as np
import pytest
import torch

from mllm.study.probes import probe_accuracies, quadrant_pool
from mllm.study.stats import accuracy_ci, holm, paired_difference, tost


def test_holm_matches_hand_computation():
    # sorted p: 0.01*4=0.04, 0.03*3=0.09, 0.04*2=0.08 -> running max 0.09, 0.2*1=0.2
    assert holm([0.01, 0.04, 0.2, 0.03]) == pytest.approx([0.04, 0.09, 0.2, 0.09])
    assert holm([0.5]) == [0.5]


def test_accuracy_ci_covers_mean_and_collapses_without_variation():
    ids = np.repeat(np.arange(200), 3)
    constant = np.ones((2, 600))
    assert accuracy_ci(constant, ids) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(0)
    values = (rng.random((3, 600)) < 0.6).astype(float)
    mean, low, high = accuracy_ci(values, ids)
    assert mean == pytest.approx(values.mean()) and low < mean < high and high - low < 0.12


def test_paired_difference_detects_a_real_gap_and_not_a_fake_one():
    rng = np.random.default_rng(1)
    ids = np.repeat(np.arange(400), 4)
    base = (rng.random((3, 1600)) < 0.5).astype(float)
    better = np.maximum(base, (rng.random((3, 1600)) < 0.3))  # strictly more correct answers
    diff = paired_difference(better, base, ids)
    assert diff.delta == pytest.approx(better.mean() - base.mean()) and diff.low > 0 and diff.p < 0.01
    same = paired_difference(base, base[[1, 2, 0]], ids)  # the same runs, seeds relabelled
    assert same.delta == pytest.approx(0.0) and same.low < 0 < same.high and same.p > 0.5


def test_paired_difference_is_paired_over_images():
    # b = a shifted by a constant 0.1 per image: pairing makes the CI tight around 0.1
    ids = np.repeat(np.arange(100), 10)
    a = np.tile((np.arange(1000) % 10 < 6).astype(float), (2, 1))
    b = np.tile((np.arange(1000) % 10 < 5).astype(float), (2, 1))
    diff = paired_difference(a, b, ids)
    assert diff.delta == pytest.approx(0.1) and diff.low == pytest.approx(0.1) and diff.high == pytest.approx(0.1)


def test_tost_equivalence_needs_a_narrow_interval():
    ids = np.repeat(np.arange(500), 4)
    rng = np.random.default_rng(2)
    a = (rng.random((3, 2000)) < 0.7).astype(float)
    close = paired_difference(a, a, ids)
    assert tost(close, margin=0.05) < 0.05
    far = paired_difference(a, np.zeros_like(a), ids)
    assert tost(far, margin=0.05) > 0.5


def test_quadrant_pool_takes_each_quadrants_cells():
    grid, channels = 4, 2
    tokens = torch.arange(grid * grid * channels, dtype=torch.float32).view(1, grid * grid, channels)
    pooled = quadrant_pool(tokens, grid)
    assert pooled.shape == (1, 4, 4 * channels)
    cell = lambda r, c: tokens[0, r * grid + c].tolist()  # noqa: E731
    assert pooled[0, 0].tolist() == cell(0, 0) + cell(0, 1) + cell(1, 0) + cell(1, 1)
    assert pooled[0, 3].tolist() == cell(2, 2) + cell(2, 3) + cell(3, 2) + cell(3, 3)


def test_probe_reads_a_linearly_coded_attribute_and_not_noise():
    from distill.toy.world import QA_KINDS, SHAPES, TEXTURES

    rng = np.random.default_rng(3)

    def fake(n_images):
        objects, tokens = [], torch.randn(n_images, 4, 12) * 0.01  # grid 2: token q is quadrant q
        for i in range(n_images):
            for q in range(4):
                shape, texture = SHAPES[rng.integers(4)], TEXTURES[rng.integers(4)]
                labels = {"shape": shape, "texture": texture, "size": "small", "fusion": f"{texture} {shape}"}
                objects.append((i, q, labels))
                tokens[i, q, SHAPES.index(shape)] += 1.0  # shape is coded, texture is not
        return tokens, objects

    train_tokens, train_objects = fake(150)
    test_tokens, test_objects = fake(60)
    acc = probe_accuracies(train_tokens, train_objects, test_tokens, test_objects, grid=2)
    assert set(acc) == set(QA_KINDS) | {"overall"}
    assert acc["shape"] == 1.0 and acc["size"] == 1.0
    assert acc["texture"] < 0.45  # chance is 1/4
