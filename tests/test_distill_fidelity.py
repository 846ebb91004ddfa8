"""Distillation details that decide real-scale fidelity (issue 10, item 4): which parameters get weight
decay, teachers must see the student's whole view, and the mse loss uses fixed calibrated statistics."""

from types import SimpleNamespace

import pytest
import torch

from distill.encoders import OpenClipEncoder, SamEncoder, TimmEncoder
from distill.encoders import resize as R
from distill.model import StudentModel
from distill.module import DistillModule
from distill.teacher import Teacher

STUDENT_ARGS = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}


def make_module(files, dense_loss="cosine_smooth_l1", dino_crop_pct=1.0, **kwargs) -> DistillModule:
    teachers = [
        Teacher("clip", OpenClipEncoder(f"local-dir:{files['clip']}")),
        Teacher("dino", TimmEncoder(f"local-dir:{files['dino']}", crop_pct=dino_crop_pct)),
        Teacher("sam", SamEncoder("tiny", str(files["sam"]))),
    ]
    student = StudentModel("vit_small_patch16_224", ["clip", "dino"], num_registers=2, img_size=32, model_args=STUDENT_ARGS)
    return DistillModule(student, teachers, dense_loss=dense_loss, adaptor_hidden_dim=32, **kwargs)


# ---------------------------------------------------------------- weight decay


def test_no_weight_decay_on_pos_embed_tokens_norms_biases(tiny_teacher_files):
    module = make_module(
        tiny_teacher_files, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    )
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)  # all configure_optimizers reads
    optimizer = module.configure_optimizers()["optimizer"]
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    names = {name: decay_of.get(id(p)) for name, p in module.named_parameters() if p.requires_grad}
    assert len(decay_of) == len(names)  # every trainable parameter exactly once, no teacher parameter
    for name in ("pos_embed", "cls_token", "reg_token", "norm.weight", "norm.bias", "blocks.0.norm1.weight",
                 "blocks.0.attn.qkv.bias", "patch_embed.proj.bias"):
        assert names[f"student.model.{name}"] == 0.0, name
    assert names["student.heads.clip.dense.net.1.weight"] == 0.0  # adaptor LayerNorm
    assert names["student.heads.clip.dense.net.0.bias"] == 0.0
    for name in ("student.model.patch_embed.proj.weight", "student.model.blocks.0.attn.qkv.weight",
                 "student.model.blocks.1.mlp.fc2.weight", "student.heads.clip.dense.net.0.weight", "student.heads.sam.dense.net.3.weight"):
        assert names[name] == 0.05, name  # the optimizer's configured weight decay


# ---------------------------------------------------------------- teacher view (crop_pct)


def test_teacher_with_crop_pct_below_one_is_refused(tiny_teacher_files):
    # the tiny timm folder keeps timm's classification crop_pct=0.9, like most ImageNet checkpoints
    with pytest.raises(ValueError, match=r"Teacher 'dino' \(local-dir:.*dino\) centre-crops with crop_pct=0.9.*crop_pct: 1.0"):
        make_module(tiny_teacher_files, dino_crop_pct=None)


def test_crop_pct_one_sees_the_whole_view(tiny_teacher_files):
    full = TimmEncoder(f"local-dir:{tiny_teacher_files['dino']}", crop_pct=1.0)
    library = TimmEncoder(f"local-dir:{tiny_teacher_files['dino']}")  # timm's eval transform: centre 90%
    assert library.crop_pct == pytest.approx(0.9) and full.crop_pct == 1.0
    images = torch.rand(2, 3, 40, 40)
    cfg = full.data_config
    whole = R.normalize(R.resize(images, (32, 32), cfg["interpolation"]), cfg["mean"], cfg["std"])
    torch.testing.assert_close(full.preprocess(images), whole)
    assert not torch.allclose(library.preprocess(images), whole, atol=1e-2)
    with pytest.raises(ValueError, match="crop_pct=1.5 must be in"):
        TimmEncoder(f"local-dir:{tiny_teacher_files['dino']}", crop_pct=1.5)


# ---------------------------------------------------------------- mse statistics


def hand_stats(module, batches, name):
    teacher = next(t for t in module.teachers if t.name == name)
    feats = torch.cat([teacher.targets(b).dense for b in batches]).double()
    flat = feats.transpose(0, 1).flatten(1)
    return flat.mean(1).float(), flat.std(1).float(), flat.shape[1]


def test_mse_statistics_are_calibrated_then_fixed(tiny_teacher_files):
    torch.manual_seed(0)
    module = make_module(tiny_teacher_files, "mse")
    module.log = lambda *a, **k: None
    batches = [torch.rand(3, 3, 32, 32), torch.rand(2, 3, 40, 40)]
    with pytest.raises(RuntimeError, match="not calibrated"):
        module.teacher_losses(batches[0], "train")
    module.calibrate(batches)
    for name in ("clip", "dino", "sam"):
        mean, std, count = hand_stats(module, batches, name)
        norm = module.dense_norm[name]
        torch.testing.assert_close(norm.mean, mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(norm.std, std, atol=1e-5, rtol=1e-5)
        assert norm.count.item() == count
    before = {k: v.clone() for k, v in module.dense_norm.state_dict().items()}
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    module.train()
    for images in [torch.rand(4, 3, 32, 32) * 2, torch.rand(4, 3, 32, 32) * 0.5]:  # other distributions
        loss = module.teacher_losses(images, "train")
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = module.dense_norm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the loss is the MSE against the standardized target
    images = batches[0]
    target = module.teachers[0].targets(images).dense
    standardized = (target - before["clip.mean"].view(1, -1, 1, 1)) / before["clip.std"].view(1, -1, 1, 1)
    assert standardized.mean().abs() < 0.5 and 0.5 < standardized.std() < 2


class SummingStrategy:
    """Stands in for a 2-rank DDP strategy: reduce(sum) adds the other rank's statistics (same call order)."""

    def __init__(self, other_rank: list[torch.Tensor]) -> None:
        self.other_rank = list(other_rank)
        self.calls = []

    def reduce(self, tensor, reduce_op="mean"):
        self.calls.append(reduce_op)
        return tensor + self.other_rank.pop(0)


def test_calibration_sums_statistics_over_ranks(tiny_teacher_files):
    torch.manual_seed(1)
    rank0 = make_module(tiny_teacher_files, "mse")
    rank1 = make_module(tiny_teacher_files, "mse")
    batches0, batches1 = [torch.rand(2, 3, 32, 32)], [torch.rand(3, 3, 32, 32)]

    def local_sums(module, batches):
        return [sum(module.dense_norm[t.name].statistics(t.targets(b).dense) for b in batches) for t in module.teachers]

    rank0._trainer = SimpleNamespace(strategy=SummingStrategy(local_sums(rank1, batches1)))
    rank1._trainer = SimpleNamespace(strategy=SummingStrategy(local_sums(rank0, batches0)))
    rank0.calibrate(batches0)
    rank1.calibrate(batches1)
    assert rank0.trainer.strategy.calls == ["sum"] * 3
    for name in ("clip", "dino", "sam"):
        mean, std, count = hand_stats(rank0, batches0 + batches1, name)
        for module in (rank0, rank1):
            torch.testing.assert_close(module.dense_norm[name].mean, mean, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(module.dense_norm[name].std, std, atol=1e-5, rtol=1e-5)
            assert module.dense_norm[name].count.item() == count
        assert torch.equal(rank0.dense_norm[name].std, rank1.dense_norm[name].std)


def test_calibration_without_images_names_the_data(tiny_teacher_files):
    module = make_module(tiny_teacher_files, "mse")
    with pytest.raises(ValueError, match="got no images; check the training data source"):
        module.calibrate([torch.zeros(0, 3, 32, 32)])
    assert not module.dense_norm["clip"].fitted
