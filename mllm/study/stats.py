"""Statistics of the study: accuracies with confidence intervals, paired differences, Holm, TOST.

Every run of every variant answers the same evaluation questions, so each comparison is paired. The
unit of resampling is the image (its questions are correlated) and the seed: one bootstrap replicate
draws images with replacement (the same draw for both variants: paired) and, for each variant, seeds
with replacement; the statistic is the mean over the drawn seeds of the accuracy on the drawn images.

    correct = {"clip": np.array([[1, 0, ...], ...])}        # [seeds, questions] of 0/1
    acc = accuracy_ci(correct["clip"], image_ids)           # (mean, low, high)
    diff = paired_difference(correct["a"], correct["b"], image_ids)   # Δ, CI, two-sided p, replicates
    holm([0.01, 0.04, 0.2])                                 # adjusted p-values
    tost(diff, margin=0.02)                                 # equivalence p-value
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOOTSTRAPS = 4000
ALPHA = 0.05


@dataclass
class Difference:
    """A paired difference of accuracies (a − b) with its bootstrap distribution."""

    delta: float
    low: float
    high: float
    p: float
    replicates: np.ndarray


def _per_image(correct: np.ndarray, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Correct answers per (seed, image) [S, I] and questions per image [I] (images in sorted id order)."""
    _, inverse = np.unique(image_ids, return_inverse=True)
    sums = np.stack([np.bincount(inverse, weights=row, minlength=inverse.max() + 1) for row in np.atleast_2d(correct)])
    return sums, np.bincount(inverse).astype(float)


def _replicates(correct: np.ndarray, image_ids: np.ndarray, weights: np.ndarray, seed_draws: np.ndarray) -> np.ndarray:
    """Bootstrap accuracies [B]: image weights [B, I] (draw counts), seed draws [B, S] (indices)."""
    sums, counts = _per_image(correct, image_ids)
    acc = (weights @ sums.T) / (weights @ counts)[:, None]  # [B, S]: each seed on each replicate's images
    return np.take_along_axis(acc, seed_draws, axis=1).mean(1)


def _draws(num_images: int, num_seeds: int, rng: np.random.Generator, bootstraps: int) -> tuple[np.ndarray, np.ndarray]:
    weights = rng.multinomial(num_images, np.full(num_images, 1.0 / num_images), size=bootstraps).astype(float)
    return weights, rng.integers(0, num_seeds, size=(bootstraps, num_seeds))


def accuracy_ci(correct: np.ndarray, image_ids: np.ndarray, bootstraps: int = BOOTSTRAPS, seed: int = 0) -> tuple[float, float, float]:
    """Mean accuracy over seeds and its 95% bootstrap interval (images and seeds resampled)."""
    correct = np.atleast_2d(np.asarray(correct, dtype=float))
    rng = np.random.default_rng(seed)
    weights, seeds = _draws(len(np.unique(image_ids)), len(correct), rng, bootstraps)
    reps = _replicates(correct, image_ids, weights, seeds)
    return float(correct.mean()), float(np.quantile(reps, ALPHA / 2)), float(np.quantile(reps, 1 - ALPHA / 2))


def paired_difference(a: np.ndarray, b: np.ndarray, image_ids: np.ndarray, bootstraps: int = BOOTSTRAPS,
                      seed: int = 0) -> Difference:
    """Accuracy of a minus b on the same questions: Δ, 95% CI, two-sided bootstrap p-value (H0: Δ = 0)."""
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired_difference needs the same questions: a has {a.shape[1]}, b has {b.shape[1]}.")
    rng = np.random.default_rng(seed)
    weights, seeds_a = _draws(len(np.unique(image_ids)), len(a), rng, bootstraps)
    seeds_b = rng.integers(0, len(b), size=(bootstraps, len(b)))
    reps = _replicates(a, image_ids, weights, seeds_a) - _replicates(b, image_ids, weights, seeds_b)
    below, above = (np.sum(reps <= 0) + 1) / (bootstraps + 1), (np.sum(reps >= 0) + 1) / (bootstraps + 1)
    return Difference(float(a.mean() - b.mean()), float(np.quantile(reps, ALPHA / 2)),
                      float(np.quantile(reps, 1 - ALPHA / 2)), float(min(1.0, 2 * min(below, above))), reps)


def holm(p_values: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (same order as given)."""
    order = np.argsort(p_values)
    adjusted = np.empty(len(p_values))
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted.tolist()


def tost(diff: Difference, margin: float) -> float:
    """Equivalence p-value of two one-sided tests (H0: |Δ| >= margin) from the bootstrap replicates;
    below ALPHA means the difference lies within ±margin."""
    reps, n = diff.replicates, len(diff.replicates)
    p_low = (np.sum(reps <= -margin) + 1) / (n + 1)
    p_high = (np.sum(reps >= margin) + 1) / (n + 1)
    return float(max(p_low, p_high))
