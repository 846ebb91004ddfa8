"""Several students per teacher pass (issue 19 item 4, `model.students`): one teacher forward feeds every student,
each student's loss equals what a single-student module computes, optimizer groups per student with their lr
scale, mse statistics shared, checkpoint + EMA + export per student."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.losses_radio4 import translate
from distill.model import StudentModel
from distill.module import DistillModule
from distill.students import StudentSpec
from distill.teacher import Teacher
from tiny_teachers import tiny_teacher_set

ARGS = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}
SMALL = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


def teachers(files) -> list[Teacher]:
    return tiny_teacher_set(files)


def student(args=ARGS) -> StudentModel:
    return StudentModel("vit_small_patch16_224", ["clip", "dino"], num_registers=2, img_size=32, model_args=args)


def make_module(files, **kwargs) -> DistillModule:
    extra = [StudentSpec("small", student(SMALL), lr_scale=2.0, adaptor_hidden_dim=16), StudentSpec("twin", student())]
    module = DistillModule(student(), teachers(files), adaptor_hidden_dim=32, students=extra, **kwargs)
    module.log = lambda *a, **k: None  # no trainer attached
    return module


def test_one_teacher_pass_feeds_every_student(tiny_teacher_files):
    torch.manual_seed(0)
    module = make_module(tiny_teacher_files)
    calls = {t.name: 0 for t in module.teachers}
    for t in module.teachers:
        t.encoder.register_forward_hook(lambda m, a, o, name=t.name: calls.__setitem__(name, calls[name] + 1))
    images = torch.rand(2, 3, 32, 32)
    total = module.teacher_losses(images, "train")
    assert calls == {"clip": 1, "dino": 1, "sam": 1}
    total.backward()
    for name, model in module.all_students().items():
        assert all(p.grad is not None for p in model.heads.parameters()), name
        assert model.model.patch_embed.proj.weight.grad.abs().sum() > 0, name
    assert list(module.all_students()) == ["student", "small", "twin"]
    assert module.students["small"].heads["clip"].config["hidden_dim"] == 16

    # each student's part equals a single-student module with the same weights on the same targets
    targets = module.teacher_targets(images)
    parts = {name: module.student_losses(images, targets, "train", name, i * 3)
             for i, name in enumerate(module.all_students())}
    torch.testing.assert_close(sum(parts.values()), module.teacher_losses(images, "train"))
    for name, model in module.all_students().items():
        single = DistillModule(student(SMALL if name == "small" else ARGS), module.teachers, adaptor_hidden_dim=16 if name == "small" else 32)
        single.student.load_state_dict(model.state_dict())
        single.log = lambda *a, **k: None
        torch.testing.assert_close(single.teacher_losses(images, "train"), parts[name])


def test_logs_are_per_student(tiny_teacher_files):
    module = make_module(tiny_teacher_files)
    logged = {}
    module.log = lambda key, value, **k: logged.__setitem__(key, float(value))
    with torch.no_grad():
        module.eval().validation_step(torch.rand(2, 3, 32, 32), 0)
    assert {"val/clip/dense_cos", "val/small/clip/dense_cos", "val/twin/sam/dense_cos", "val/small/loss"} <= set(logged)
    assert logged["val/loss"] == pytest.approx(logged["val/small/loss"] + logged["val/twin/loss"] + sum(
        logged[f"val/{t}/{part}_loss"] for t in ("clip", "dino", "sam") for part in ("summary", "dense")
        if f"val/{t}/{part}_loss" in logged), rel=1e-5)


def test_parameter_groups_per_student_with_lr_scale(tiny_teacher_files):
    module = make_module(tiny_teacher_files, ema_decay=0.9)
    groups = module.parameter_groups()
    grouped = [p for g in groups for p in g["params"]]
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert len(grouped) == len(set(map(id, grouped))) == len(trainable)  # every trainable parameter once; EMA none
    small = {id(p) for p in module.students["small"].parameters()}
    for group in groups:
        ids = {id(p) for p in group["params"]}
        assert group.get("lr_scale", 1.0) == (2.0 if ids <= small else 1.0)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    for group in optimizer.param_groups:  # what configure_optimizers does before the schedule
        group["lr"] *= group.get("lr_scale", 1.0)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [1e-3, 2e-3]


def test_mse_statistics_are_shared_by_every_student(tiny_teacher_files):
    module = make_module(tiny_teacher_files, dense_loss="mse")
    module.calibrate([torch.rand(2, 3, 32, 32)])
    for name, model in module.all_students().items():
        for teacher, head in model.heads.items():
            assert head.norm.fitted
            assert torch.equal(head.norm.std, module.student.heads[teacher].norm.std), (name, teacher)


def test_student_names_are_checked(tiny_teacher_files):
    with pytest.raises(ValueError, match="other than 'student'"):
        StudentSpec("student", student())
    with pytest.raises(ValueError, match="differ from the teachers"):
        DistillModule(student(), teachers(tiny_teacher_files), students=[StudentSpec("clip", student())])
    wrong = StudentModel("vit_small_patch16_224", ["clip"], img_size=32, model_args=ARGS)
    with pytest.raises(ValueError, match=r"students\[odd\].student.summary_names"):
        DistillModule(student(), teachers(tiny_teacher_files), students=[StudentSpec("odd", wrong)])


def test_fit_checkpoint_and_export_per_student(tmp_path, tiny_teacher_files):
    """CLI fit with model.students + EMA: checkpoint keys per student, val logs per student, export by name
    (EMA by default) and --all-students."""
    from test_distill_fit import write_config

    from distill.cli import lightning_cli, main

    path = write_config(tmp_path, tiny_teacher_files, 2)
    config = yaml.safe_load(path.read_text())
    config["model"]["ema_decay"] = 0.5
    config["model"]["students"] = [{"class_path": "distill.students.StudentSpec", "init_args": {
        "name": "small", "lr_scale": 2.0, "student": {"class_path": "distill.model.StudentModel", "init_args": {
            "model_name": "vit_small_patch16_224", "summary_names": ["clip", "dino"], "img_size": 32,
            "model_args": SMALL}}}}]
    path.write_text(yaml.safe_dump(config))
    cli = lightning_cli(["fit", "-c", str(path)])
    assert "val/small/clip/dense_cos" in cli.trainer.callback_metrics and "val/clip/dense_cos" in cli.trainer.callback_metrics
    lrs = sorted({g["initial_lr"] for g in cli.trainer.optimizers[0].param_groups})
    assert lrs == [pytest.approx(x) for x in (1e-3, 2e-3)]  # AdamW's default lr 1e-3, and x2 for small
    last = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(last, weights_only=True)["state_dict"]
    assert state["ema.small.n_averaged"].item() == state["ema.student.n_averaged"].item() == 2
    assert any(k.startswith("students.small.model.") for k in state)

    main(["export", "--ckpt", str(last), "--out", str(tmp_path / "small"), "--student", "small", "--with-adaptors"])
    backbone = load_file(str(tmp_path / "small" / "model.safetensors"))
    assert backbone["patch_embed.proj.weight"].shape[0] == SMALL["embed_dim"]
    assert all(torch.equal(v, state[f"ema.small.module.model.{k}"]) for k, v in backbone.items())
    assert json.loads((tmp_path / "small" / "config.json").read_text())["unitower"]["weights"] == "ema"

    main(["export", "--ckpt", str(last), "--out", str(tmp_path / "all"), "--all-students", "--no-ema"])
    for name, prefix in (("student", "student."), ("small", "students.small.")):
        backbone = load_file(str(tmp_path / "all" / name / "model.safetensors"))
        assert all(torch.equal(v, state[f"{prefix}model.{k}"]) for k, v in backbone.items()), name
    with pytest.raises(KeyError, match="no student 'big'"):
        main(["export", "--ckpt", str(last), "--out", str(tmp_path / "x"), "--student", "big"])


def test_every_student_sees_the_shifted_view_and_the_radio4_losses(tiny_teacher_files):
    """model.students with C-RADIOv4's options (issue 19 items 2 + 4 together): one shifted teacher pass, and each
    student's part equals a single-student module with the same options and weights on the same step."""
    torch.manual_seed(0)
    options = {"shift_equivariant": True, "shift_std": 1.0, "summary_loss": "angle_balanced"}
    module = make_module(tiny_teacher_files, **options)
    images = torch.rand(2, 3, 32, 32)
    shifts = module.view_shifts(images, None, module.active_teachers("train"), None)
    assert any(v != (0, 0) for v in shifts["pixels"].values()), "seeded draw gave no shift at all: pick another std"
    total = module.teacher_losses(images, "train")
    total.backward()
    for name, model in module.all_students().items():
        assert model.model.patch_embed.proj.weight.grad.abs().sum() > 0, name
    for name, model in module.all_students().items():
        single = DistillModule(student(SMALL if name == "small" else ARGS), module.teachers,
                               adaptor_hidden_dim=16 if name == "small" else 32, **options)
        single.student.load_state_dict(model.state_dict())
        single.log = lambda *a, **k: None
        index = list(module.all_students()).index(name)
        targets = {t.name: t.targets(translate(images, *shifts["pixels"][t.name])) for t in module.teachers}
        part = module.student_losses(images, targets, "train", name, index * 3, shifts)
        torch.testing.assert_close(single.teacher_losses(images, "train"), part)
