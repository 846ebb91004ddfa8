"""Linear probes on frozen tower features: what does a tower know, before any LLaVA is trained?

For every object (an image quadrant that holds one), the tokens of its quadrant are concatenated into
one vector and a closed-form ridge classifier (least squares onto one-hot targets, standardized
features, ridge strength picked on a held-out fifth of the training objects) predicts each attribute
the study asks about: colour, texture, size and their fusion (colour x texture, 18 classes).

    acc = probe_accuracies(train_tokens, train_objects, test_tokens, test_objects, grid=4)
    # {"color": 0.98, "texture": 0.71, "size": 0.93, "fusion": 0.69}
"""

from __future__ import annotations

import torch

from distill.toy.world import QA_KINDS, ToyWorld, answer_options

RIDGE_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0)


def quadrant_pool(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """Per-quadrant features [num_images, 4, (grid/2)^2 * C] from row-major tokens [num_images, grid*grid, C]:
    the cells of each quadrant (top left, top right, bottom left, bottom right) concatenated in row order."""
    if grid % 2 or tokens.shape[1] != grid * grid:
        raise ValueError(f"quadrant_pool needs an even grid and grid*grid tokens; got grid={grid}, tokens {tuple(tokens.shape)}.")
    n, _, c = tokens.shape
    cells = tokens.reshape(n, 2, grid // 2, 2, grid // 2, c).permute(0, 1, 3, 2, 4, 5)
    return cells.reshape(n, 4, (grid // 2) ** 2 * c)


def object_labels(seed: int, num_images: int, image_size: int, max_objects: int = 4) -> list[tuple[int, int, dict[str, str]]]:
    """(image index, quadrant, {kind: answer}) of every object of the first `num_images` images."""
    world = ToyWorld(seed=seed, image_size=image_size, max_objects=max_objects)
    return [(i, obj.quadrant, {kind: obj.answer(kind) for kind in QA_KINDS})
            for i in range(num_images) for obj in world.describe(i).objects]  # the same objects, nothing drawn


def _gather(tokens: torch.Tensor, objects: list, grid: int) -> torch.Tensor:
    pooled = quadrant_pool(tokens.float(), grid)
    index = torch.tensor([[i, q] for i, q, _ in objects])
    return pooled[index[:, 0], index[:, 1]].double()


def _ridge(x: torch.Tensor, y: torch.Tensor, strength: float) -> torch.Tensor:
    """Weights [D+1, K] of ridge regression with bias (the bias is not penalized)."""
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    penalty = strength * len(x) / 1000.0 * torch.eye(x1.shape[1], dtype=x.dtype)
    penalty[-1, -1] = 0.0
    return torch.linalg.solve(x1.T @ x1 + penalty, x1.T @ y)


def _predict(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ weights).argmax(1)


def probe_accuracies(train_tokens: torch.Tensor, train_objects: list, test_tokens: torch.Tensor,
                     test_objects: list, grid: int) -> dict[str, float]:
    """Held-out accuracy of a ridge probe per attribute kind (see the module docstring)."""
    x_train, x_test = _gather(train_tokens, train_objects, grid), _gather(test_tokens, test_objects, grid)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    cut = len(x_train) * 4 // 5
    result = {}
    for kind in QA_KINDS:
        options = answer_options(kind)
        y_train = torch.tensor([options.index(labels[kind]) for _, _, labels in train_objects])
        y_test = torch.tensor([options.index(labels[kind]) for _, _, labels in test_objects])
        onehot = torch.nn.functional.one_hot(y_train, len(options)).double()
        best = max(RIDGE_GRID, key=lambda s: (_predict(_ridge(x_train[:cut], onehot[:cut], s), x_train[cut:])
                                              == y_train[cut:]).double().mean().item())
        weights = _ridge(x_train, onehot, best)
        result[kind] = float((_predict(weights, x_test) == y_test).double().mean())
    result["overall"] = sum(result[k] for k in QA_KINDS) / len(QA_KINDS)
    return result
