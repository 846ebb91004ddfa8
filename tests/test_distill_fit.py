"""Distillation end to end on tiny teachers: loss goes down, CLI fit + resume, export round trip via timm."""

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml

from distill.encoders import OpenClipEncoder, SamEncoder, TimmEncoder
from distill.module import DistillModule
from distill.student import StudentViT
from distill.teacher import Teacher

STUDENT_ARGS = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}


def make_module(files, dense_loss="cosine_smooth_l1") -> DistillModule:
    teachers = [
        Teacher("clip", OpenClipEncoder(f"local-dir:{files['clip']}")),
        Teacher("dino", TimmEncoder(f"local-dir:{files['dino']}", crop_pct=1.0)),
        Teacher("sam", SamEncoder("tiny", str(files["sam"]))),
    ]
    student = StudentViT("vit_small_patch16_224", ["clip", "dino"], num_registers=2, img_size=32, model_args=STUDENT_ARGS)
    return DistillModule(student, teachers, dense_loss=dense_loss, adaptor_hidden_dim=64)


@pytest.mark.parametrize("dense_loss", ["cosine_smooth_l1", "mse"])
def test_steps_lower_loss_on_fixed_batch(tiny_teacher_files, dense_loss):
    torch.manual_seed(0)
    module = make_module(tiny_teacher_files, dense_loss)
    module.log = lambda *a, **k: None  # no trainer attached
    images = torch.rand(4, 3, 32, 32)
    if dense_loss == "mse":
        module.calibrate([images])
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    module.train()
    assert all(not t.encoder.training for t in module.teachers)  # frozen teachers stay in eval
    first = None
    for _ in range(25):
        loss = module.teacher_losses(images, "train")
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = module.teacher_losses(images, "train").item()
    assert final < 0.7 * first, (first, final)
    assert all(p.grad is None for p in module.teachers.parameters())


def test_summary_names_must_match_teachers(tiny_teacher_files):
    teachers = [Teacher("sam", SamEncoder("tiny", str(tiny_teacher_files["sam"])))]
    student = StudentViT("vit_small_patch16_224", ["clip"], img_size=32, model_args=STUDENT_ARGS)
    with pytest.raises(ValueError, match=r"summary_names: \[\]"):
        DistillModule(student, teachers)


def write_config(tmp_path: Path, files, max_steps: int) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "logger": False,
            "default_root_dir": str(tmp_path / "run"), "enable_progress_bar": False,
            "val_check_interval": 2, "limit_val_batches": 1,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "every_n_train_steps": 2}}],
        },
        "model": {
            "student": {"class_path": "distill.student.StudentViT", "init_args": {
                "model_name": "vit_small_patch16_224", "summary_names": ["clip", "dino"], "num_registers": 2,
                "img_size": 32, "model_args": STUDENT_ARGS}},
            "teachers": [
                {"class_path": "distill.teacher.Teacher", "init_args": {"name": "clip", "encoder": {
                    "class_path": "distill.encoders.OpenClipEncoder", "init_args": {"model_name": f"local-dir:{files['clip']}"}}}},
                {"class_path": "distill.teacher.Teacher", "init_args": {"name": "dino", "encoder": {
                    "class_path": "distill.encoders.TimmEncoder", "init_args": {"model_name": f"local-dir:{files['dino']}", "crop_pct": 1.0}}}},
                {"class_path": "distill.teacher.Teacher", "init_args": {"name": "sam", "dense_weight": 0.5, "encoder": {
                    "class_path": "distill.encoders.SamEncoder", "init_args": {"variant": "tiny", "checkpoint": str(files["sam"])}}}},
            ],
            "adaptor_hidden_dim": 32,
            "warmup_steps": 2,
        },
        "data": {
            "train": {"class_path": "distill.data.ToyImages", "init_args": {"image_size": 40, "length": 64}},
            "val": {"class_path": "distill.data.ToyImages", "init_args": {"seed": 1000, "image_size": 40, "length": 4}},
            "image_size": 32, "batch_size": 4, "num_workers": 0,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_fit_resume_and_export(tmp_path, tiny_teacher_files):
    from distill.cli import lightning_cli, main

    config = write_config(tmp_path, tiny_teacher_files, max_steps=4)
    cli = lightning_cli(["fit", "-c", str(config)])
    assert cli.trainer.global_step == 4
    from distill.checkpoint_io import AtomicCheckpointIO

    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert (tmp_path / "run" / "config.yaml").is_file()  # every run keeps its config
    metrics = cli.trainer.callback_metrics
    for name in ("clip", "dino", "sam"):
        assert f"val/{name}/dense_cos" in metrics
    assert "val/sam/summary_cos" not in metrics
    last = tmp_path / "ckpt" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert not any(k.startswith("teachers.") for k in ckpt["state_dict"])  # teachers stay in their own files

    # Resume: continues from step 4 to 6 with the saved optimizer state.
    config6 = write_config(tmp_path, tiny_teacher_files, max_steps=6)
    cli2 = lightning_cli(["fit", "-c", str(config6), "--ckpt_path", str(last)])
    assert cli2.trainer.global_step == 6

    # Export and load with plain timm.
    out = tmp_path / "export"
    main(["export", "--ckpt", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(out), "--with-adaptors"])
    assert json.loads((out / "config.json").read_text())["unitower"]["summary_names"] == ["clip", "dino"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    student = cli2.model.student.eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = student(images)
        tokens = model.forward_features((images - student.mean) / student.std)
    got = student.split_tokens(tokens, (32, 32))
    torch.testing.assert_close(got.dense, expected.dense)
    torch.testing.assert_close(got.summary["dino"], expected.summary["dino"])

    # The adaptors reproduce the trained heads' outputs in the teacher's space.
    from distill.exported import StudentEncoder

    enc = StudentEncoder(str(out), adaptors=["clip"]).eval()
    with torch.no_grad():
        pred = enc(images)
        ref_summary, ref_dense = cli2.model.heads["clip"].eval()(expected.summary["clip"], expected.dense)
    torch.testing.assert_close(pred.dense, ref_dense)
    torch.testing.assert_close(pred.summary, ref_summary)


def test_export_rejects_missing_checkpoint(tmp_path):
    from distill.export import export_student

    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        export_student(tmp_path / "nope.ckpt", tmp_path / "out")
