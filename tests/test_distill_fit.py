"""Distillation end to end on tiny teachers: loss goes down, CLI fit + resume, export round trip via timm."""

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml

from distill.encoders import OpenClipEncoder, SamEncoder, TimmEncoder
from distill.model import StudentModel
from distill.module import DistillModule
from distill.teacher import Teacher

STUDENT_ARGS = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}


def make_module(files, dense_loss="cosine_smooth_l1") -> DistillModule:
    teachers = [
        Teacher("clip", OpenClipEncoder(f"local-dir:{files['clip']}")),
        Teacher("dino", TimmEncoder(f"local-dir:{files['dino']}", crop_pct=1.0)),
        Teacher("sam", SamEncoder("tiny", str(files["sam"]))),
    ]
    student = StudentModel("vit_small_patch16_224", ["clip", "dino"], num_registers=2, img_size=32, model_args=STUDENT_ARGS)
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
    student = StudentModel("vit_small_patch16_224", ["clip"], img_size=32, model_args=STUDENT_ARGS)
    with pytest.raises(ValueError, match=r"summary_names: \[\]"):
        DistillModule(student, teachers)


def write_config(tmp_path: Path, files, max_steps: int, dense_loss: str = "cosine_smooth_l1") -> Path:
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
            "student": {"class_path": "distill.model.StudentModel", "init_args": {
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
            "dense_loss": dense_loss,
            "calibration_batches": CALIBRATION_BATCHES,
            "adaptor_hidden_dim": 32,
            "warmup_steps": 2,
        },
        "data": {
            "train": {"class_path": "distill.data.ToyImages", "init_args": {"image_size": 40, "length": 64}},
            "val": {"class_path": "distill.data.ToyImages", "init_args": {"seed": 1000, "image_size": 40, "length": 4}},
            "image_size": 32, "batch_size": BATCH, "num_workers": 0,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


CALIBRATION_BATCHES, BATCH = 2, 4


@pytest.fixture(scope="module", params=["cosine_smooth_l1", "mse"])
def fitted_run(request, tmp_path_factory, tiny_teacher_files):
    """fit 4 steps, resume to 6, export with adaptors: (tmp dir, resumed cli, step-4 ckpt state, export dir)."""
    from distill.cli import lightning_cli, main

    tmp_path = tmp_path_factory.mktemp(f"fit_{request.param}")
    config = write_config(tmp_path, tiny_teacher_files, max_steps=4, dense_loss=request.param)
    cli = lightning_cli(["fit", "-c", str(config)])
    assert cli.trainer.global_step == 4
    last = tmp_path / "ckpt" / "last.ckpt"
    state4 = torch.load(last, weights_only=True)["state_dict"]
    config6 = write_config(tmp_path, tiny_teacher_files, max_steps=6, dense_loss=request.param)
    cli2 = lightning_cli(["fit", "-c", str(config6), "--ckpt_path", str(last)])
    assert cli2.trainer.global_step == 6
    out = tmp_path / "export"
    main(["export", "--ckpt", str(last), "--out", str(out), "--with-adaptors"])
    return {"tmp": tmp_path, "cli": cli, "cli2": cli2, "state4": state4, "export": out, "dense_loss": request.param}


def test_cli_fit_resume_and_export(fitted_run):
    from distill.common.checkpoint_io import AtomicCheckpointIO

    tmp_path, cli, cli2, out = fitted_run["tmp"], fitted_run["cli"], fitted_run["cli2"], fitted_run["export"]
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert (tmp_path / "run" / "config.yaml").is_file()  # every run keeps its config
    metrics = cli.trainer.callback_metrics
    for name in ("clip", "dino", "sam"):
        assert f"val/{name}/dense_cos" in metrics
    assert "val/sam/summary_cos" not in metrics
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert not any(k.startswith("teachers.") for k in ckpt["state_dict"])  # teachers stay in their own files

    # Export and load with plain timm.
    assert json.loads((out / "config.json").read_text())["unitower"]["summary_names"] == ["clip", "dino"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    student = cli2.model.student.eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = student(images)
        tokens = model.forward_features(student.conditioner(images))
    summary, dense = student.split_tokens(tokens, (32, 32))
    torch.testing.assert_close(dense, expected.dense)
    torch.testing.assert_close(summary["dino"], expected.summary["dino"])

    # The adaptors reproduce the trained heads' outputs in the teacher's space.
    from distill.exported import StudentEncoder

    enc = StudentEncoder(str(out), adaptors=["clip"]).eval()
    with torch.no_grad():
        pred = enc(images)
        ref_summary, ref_dense = student.heads["clip"](expected.summary["clip"], expected.dense)
        ref_dense = cli2.model.to_teacher_space("clip", ref_dense)
    torch.testing.assert_close(pred.dense, ref_dense)
    torch.testing.assert_close(pred.summary, ref_summary)


def test_mse_statistics_calibrated_once_kept_and_exported(fitted_run):
    """mse: the normalizers are fitted on CALIBRATION_BATCHES batches before step 1, identical at step 4 and
    after resuming to step 6 (training never touches them), written to the export and used by StudentEncoder."""
    from safetensors.torch import load_file

    from distill.exported import StudentEncoder

    state4, module, out = fitted_run["state4"], fitted_run["cli2"].model, fitted_run["export"]
    if fitted_run["dense_loss"] != "mse":
        assert not any(k.startswith(("student.heads.", "dense_norm.", "stats.")) and ".norm." in k for k in state4)
        assert json.loads((out / "adaptors.json").read_text())["dense_norm"] is None
        return
    exported = load_file(str(out / "adaptors.safetensors"))
    assert json.loads((out / "adaptors.json").read_text())["dense_norm"] == "channel_standardizer"
    for teacher in module.teachers:
        norm = module.dense_norm[teacher.name]
        grid = teacher.encoder.input_size[0] // teacher.encoder.patch_size
        assert norm.count.item() == CALIBRATION_BATCHES * BATCH * grid * grid
        assert not torch.equal(norm.std, torch.ones_like(norm.std))
        for key in ("mean", "std", "count"):
            saved = state4[f"student.heads.{teacher.name}.norm.{key}"]
            assert torch.equal(saved, getattr(norm, key)), (teacher.name, key)  # unchanged by steps 5-6 / resume
            assert torch.equal(exported[f"{teacher.name}.norm.{key}"], saved)
    enc = StudentEncoder(str(out), adaptors=["dino"]).eval()
    assert torch.equal(enc.student.heads["dino"].norm.std, module.dense_norm["dino"].std)


def test_export_rejects_missing_checkpoint(tmp_path):
    from distill.export import export_student

    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        export_student(tmp_path / "nope.ckpt", tmp_path / "out")


@pytest.mark.parametrize("loader", ["timm", "TimmWrapperModel", "AutoModel"])
def test_export_loads_in_timm_and_transformers(fitted_run, loader):
    """The export loads with timm local-dir, transformers' TimmWrapperModel and AutoModel; all give the trained
    student's tokens (before the fix transformers raised 'got multiple values for keyword argument num_classes')."""
    out, student = fitted_run["export"], fitted_run["cli2"].model.student.eval()
    images = torch.rand(2, 3, 48, 32)  # not the export's img_size: dynamic size must survive the round trip
    pixels = student.conditioner(images)
    if loader == "timm":
        model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        forward = model.forward_features
    else:
        import transformers

        cls = getattr(transformers, loader)
        model = cls.from_pretrained(str(out)).eval()
        assert type(model).__name__ == "TimmWrapperModel"
        assert model.config.unitower["summary_names"] == ["clip", "dino"]  # unitower metadata stays readable
        forward = lambda x: model(pixel_values=x).last_hidden_state
    with torch.no_grad():
        expected = student.model.forward_features(pixels)
        got = forward(pixels)
    diff = (got - expected).abs().max().item()
    print(f"export round trip via {loader}: tokens {tuple(got.shape)}, max abs diff {diff:.3e}")
    assert got.shape == expected.shape == (2, student.model.num_prefix_tokens + 6 * 4, 48)
    assert diff < 1e-5
