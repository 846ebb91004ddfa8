"""Issue 12 item 5: PHI-S for the mse path, teacher dropping, loss balancing; each against hand-computed values.
Defaults (channel_standardizer, no dropping, fixed weights) are what tests/test_distill_fit.py and the equality
check cover."""

import math

import pytest
import torch

from distill.feature_norm import PhiS, hadamard
from distill.model import StudentModel
from distill.module import DistillModule
from tiny_teachers import tiny_teacher_set

STUDENT_ARGS = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}


def make_module(files, **kwargs) -> DistillModule:
    teachers = tiny_teacher_set(files)
    student = StudentModel("vit_small_patch16_224", ["clip", "dino"], num_registers=2, img_size=32, model_args=STUDENT_ARGS)
    module = DistillModule(student, teachers, adaptor_hidden_dim=32, **kwargs)
    module.log = lambda *a, **k: None  # no trainer attached
    return module


# ---------------------------------------------------------------- PHI-S


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 48, 96, 768, 1152])
def test_hadamard_orders(n):
    H = hadamard(n)
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))
    assert torch.all(H.abs() == 1)


def test_hadamard_missing_order_names_the_fix():
    with pytest.raises(ValueError, match="order 6 .*channel_standardizer"):
        PhiS(6)


def test_phi_s_hand_computed_2d():
    """Calibration points mu + (+-2, +-1): covariance diag(16/3, 4/3) (n - 1 = 3), mean eigenvalue 10/3.
    x = mu + (2, 0) lies on the top eigenvector: U^T gives (0, +-2), H / sqrt(2) spreads it to (+-sqrt2, +-sqrt2),
    / alpha = sqrt(10/3) -> both channels +-sqrt(0.6)."""
    mu = torch.tensor([0.5, -1.0])
    points = torch.tensor([[2.0, 1.0], [2.0, -1.0], [-2.0, 1.0], [-2.0, -1.0]]) + mu
    dense = points.T.reshape(1, 2, 2, 2)  # [B, C, h, w]
    norm = PhiS(2)
    norm.fit(norm.statistics(dense))
    torch.testing.assert_close(norm.mean, mu)
    y = norm((mu + torch.tensor([2.0, 0.0])).view(1, 2, 1, 1))
    torch.testing.assert_close(y.abs().flatten(), torch.full((2,), math.sqrt(0.6)))
    out = norm(dense).flatten(2)
    torch.testing.assert_close(out.var(dim=2, unbiased=True), torch.ones(1, 2))  # unit variance in both channels
    torch.testing.assert_close(norm.inverse(y), (mu + torch.tensor([2.0, 0.0])).view(1, 2, 1, 1))


def test_phi_s_isotropic_invertible_and_additive():
    torch.manual_seed(0)
    mixing = torch.randn(12, 12) * torch.logspace(-1, 1, 12)  # correlated channels, scales over 2 decades
    a, b = (torch.einsum("oc,bchw->bohw", mixing, torch.randn(n, 12, 3, 3)) + 3.0 for n in (5, 7))
    norm, together = PhiS(12), PhiS(12)
    norm.fit(norm.statistics(a) + norm.statistics(b))  # sums over batches / ranks
    together.fit(together.statistics(torch.cat([a, b])))
    torch.testing.assert_close(norm.transform, together.transform)
    y = norm(torch.cat([a, b])).transpose(0, 1).flatten(1)
    torch.testing.assert_close(y.mean(1), torch.zeros(12), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.var(1), torch.ones(12), atol=1e-4, rtol=0)  # every channel variance 1
    torch.testing.assert_close(norm.inverse(norm(a)), a, atol=1e-4, rtol=1e-5)


def test_phi_s_module_calibrates_exports_and_reloads(tiny_teacher_files, tmp_path):
    from distill.exported import StudentEncoder

    torch.manual_seed(0)
    module = make_module(tiny_teacher_files, dense_loss="mse", dense_normalizer="phi_s")
    batches = [torch.rand(3, 3, 32, 32), torch.rand(2, 3, 32, 32)]
    module.calibrate(batches)
    clip = module.teachers[0]
    norm = module.dense_norm["clip"]
    assert isinstance(norm, PhiS) and norm.fitted
    y = norm(torch.cat([clip.targets(b).dense for b in batches])).transpose(0, 1).flatten(1)
    torch.testing.assert_close(y.var(1), torch.ones(len(y)), atol=1e-3, rtol=0)
    assert module.teacher_losses(batches[0], "train").isfinite()
    assert module.export_metadata()["dense_norm"] == "phi_s"
    out = module.student.export(tmp_path / "export")
    encoder = StudentEncoder(str(out), adaptors=["clip"]).eval()
    assert isinstance(encoder.student.heads["clip"].norm, PhiS)
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        pred = module.student.eval()(images, adaptors=["clip"]).adaptors["clip"].dense
        expected = module.to_teacher_space("clip", pred)
        torch.testing.assert_close(encoder(images).dense, expected)
    with pytest.raises(ValueError, match="dense_normalizer must be one of"):
        make_module(tiny_teacher_files, dense_loss="mse", dense_normalizer="zca")


# ---------------------------------------------------------------- teacher dropping


def test_teacher_dropping_follows_the_seeded_draws(tiny_teacher_files):
    module = make_module(tiny_teacher_files, teacher_drop_prob=0.5)
    assert module.active_teachers("val") == ["clip", "dino", "sam"]  # never in validation
    for seed in range(6):
        torch.manual_seed(seed)
        draws = torch.rand(3)
        if (draws >= 0.5).any():
            expected = [n for n, d in zip(["clip", "dino", "sam"], draws.tolist()) if d >= 0.5]
        else:  # all dropped: one kept, drawn next
            expected = [["clip", "dino", "sam"][int(torch.randint(3, ()))]]
        torch.manual_seed(seed)
        assert module.active_teachers("train") == expected, seed
    almost_all = make_module(tiny_teacher_files, teacher_drop_prob=0.999)
    assert len(almost_all.active_teachers("train")) == 1
    with pytest.raises(ValueError, match=r"teacher_drop_prob must be in \[0, 1\)"):
        make_module(tiny_teacher_files, teacher_drop_prob=1.0)


def test_dropped_teachers_are_not_run(tiny_teacher_files):
    module = make_module(tiny_teacher_files, teacher_drop_prob=0.5)
    calls = []
    for teacher in module.teachers:
        original = teacher.targets
        teacher.targets = lambda images, original=original, name=teacher.name: calls.append(name) or original(images)
    images = torch.rand(2, 3, 32, 32)
    module.active_teachers = lambda stage: ["dino"]
    loss = module.teacher_losses(images, "train")
    assert calls == ["dino"]
    weights = module.teachers[1]  # summary + dense of dino only, fixed weights 1 and 1
    targets = module.teacher_targets(images, ["dino"])["dino"]
    with torch.no_grad():
        out = module.student(images, adaptors=["dino"]).adaptors["dino"]
        from distill import losses

        expected = weights.summary_weight * losses.summary_cosine(out.summary, targets.summary) + weights.dense_weight * (
            module._dense_loss("dino", losses.resize_to_grid(out.dense, targets.dense.shape[-2:]), targets.dense, "train"))
    torch.testing.assert_close(loss.detach(), expected)


# ---------------------------------------------------------------- loss balancing


def test_normalized_balance_hand_computed(tiny_teacher_files):
    module = make_module(tiny_teacher_files, loss_balance="normalized", loss_balance_momentum=0.5)
    first = torch.tensor(2.0, requires_grad=True)
    assert module.balanced(0, 1, first, "train").item() == pytest.approx(1.0)  # the first value starts the mean
    module.balanced(0, 1, first, "train").backward()  # mean 0.5 * 2 + 0.5 * 2 = 2, detached
    assert first.grad.item() == pytest.approx(1 / 2)  # d(L / mean)/dL = 1 / mean
    second = torch.tensor(4.0)  # mean 0.5 * 2 + 0.5 * 4 = 3
    assert module.balanced(0, 1, second, "train").item() == pytest.approx(4 / 3)
    assert module.loss_mean[0, 1].item() == pytest.approx(3.0)
    assert module.balanced(0, 1, torch.tensor(6.0), "val").item() == pytest.approx(2.0)  # 6 / 3, no update
    assert module.loss_mean[0, 1].item() == pytest.approx(3.0)
    fixed = make_module(tiny_teacher_files)
    assert fixed.balanced(0, 1, second, "train") is second and not hasattr(fixed, "loss_mean")


def test_normalized_first_step_total_is_the_sum_of_weights(tiny_teacher_files):
    """Every part divided by its own value on the first step: total = sum of the configured weights
    (clip summary 1 + dense 1, dino 1 + 1, sam dense 1 = 5) whatever the losses' scales."""
    torch.manual_seed(0)
    module = make_module(tiny_teacher_files, loss_balance="normalized")
    total = module.teacher_losses(torch.rand(2, 3, 32, 32), "train")
    assert total.item() == pytest.approx(5.0, rel=1e-6)
    assert torch.all(module.loss_mean[:, 1] > 0) and module.loss_mean[2, 0] == 0  # sam has no summary part
