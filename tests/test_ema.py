"""Student EMA (issue 19 item 1, `model.ema_decay`): the hand-computed recurrence, validation on the EMA, training
unchanged by it, the checkpoint round trip (resume keeps it) and `distill export` writing EMA or raw weights."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.model import StudentModel
from distill.module import DistillModule
from tiny_teachers import tiny_teacher_set

STUDENT_ARGS = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}
DECAY = 0.75  # far from 1 so that every step moves the average visibly


def make_module(files, **kwargs) -> DistillModule:
    teachers = tiny_teacher_set(files)
    student = StudentModel("vit_small_patch16_224", ["clip", "dino"], num_registers=2, img_size=32, model_args=STUDENT_ARGS)
    return DistillModule(student, teachers, adaptor_hidden_dim=32, **kwargs)


def train_steps(module: DistillModule, images: torch.Tensor, steps: int) -> list[dict[str, torch.Tensor]]:
    """`steps` AdamW steps on `images`, each followed by the EMA update; the student's parameters after each."""
    module.log = lambda *a, **k: None  # no trainer attached
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    seen = []
    for _ in range(steps):
        loss = module.teacher_losses(images, "train")
        opt.zero_grad()
        loss.backward()
        opt.step()
        module.update_ema()
        seen.append({k: v.detach().clone() for k, v in module.student.named_parameters()})
    return seen


def test_ema_follows_the_recurrence_and_copies_buffers(tiny_teacher_files):
    torch.manual_seed(0)
    module = make_module(tiny_teacher_files, ema_decay=DECAY, dense_loss="mse")
    images = torch.rand(4, 3, 32, 32)
    module.calibrate([images])
    assert not any(p.requires_grad for p in module.ema.parameters())  # never trained, not in the optimizer
    assert module.student_for("val") is module.student  # before the first update: the trained weights
    seen = train_steps(module, images, 3)
    ema = dict(module.ema["student"].module.named_parameters())
    for name, first in seen[0].items():
        expected = first.double()
        for later in seen[1:]:
            expected = DECAY * expected + (1 - DECAY) * later[name].double()
        torch.testing.assert_close(ema[name].double(), expected, rtol=0, atol=1e-6)
    moved = [n for n in seen[0] if not torch.equal(seen[0][n], seen[-1][n])]
    assert moved and not all(torch.equal(ema[n], seen[-1][n]) for n in moved)  # neither first nor last weights
    assert module.ema["student"].n_averaged.item() == 3
    for name, buffer in module.student.named_buffers():  # the mse statistics are copied, not averaged
        assert torch.equal(dict(module.ema["student"].module.named_buffers())[name], buffer), name
    assert module.student_for("val") is module.ema["student"].module
    assert module.student_for("train") is module.student


def test_validation_scores_the_ema(tiny_teacher_files):
    torch.manual_seed(0)
    module = make_module(tiny_teacher_files, ema_decay=DECAY)
    images = torch.rand(4, 3, 32, 32)
    train_steps(module, images, 2)

    def val_logs(m: DistillModule) -> dict[str, float]:
        logs = {}
        m.log = lambda key, value, **k: logs.__setitem__(key, float(value))
        with torch.no_grad():
            m.eval().validation_step(images, 0)
        return logs

    with_ema = val_logs(module)
    ema_weights = {k: v.clone() for k, v in module.ema["student"].module.state_dict().items()}
    module.ema = torch.nn.ModuleDict()
    raw = val_logs(module)
    module.student.load_state_dict(ema_weights)
    assert val_logs(module) == with_ema  # validation ran the EMA weights
    assert raw != with_ema and "val/clip/dense_cos" in raw


def test_ema_rejects_a_decay_outside_0_1(tiny_teacher_files):
    with pytest.raises(ValueError, match="ema_decay must be in"):
        make_module(tiny_teacher_files, ema_decay=1.0)


def _config(tmp_path, files, max_steps: int, ema_decay: float | None):
    from test_distill_fit import write_config

    tmp_path.mkdir(exist_ok=True)
    path = write_config(tmp_path, files, max_steps)
    config = yaml.safe_load(path.read_text())
    config["model"]["ema_decay"] = ema_decay
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_resume_and_export_keep_the_ema(tmp_path, tiny_teacher_files):
    """CLI fit with EMA: the checkpoint holds it (n_averaged = steps), a resume continues it, the trained weights
    equal those of the same fit without EMA, export writes EMA by default and the raw weights with --no-ema."""
    from distill.cli import lightning_cli, main

    plain = lightning_cli(["fit", "-c", str(_config(tmp_path / "plain", tiny_teacher_files, 4, None))])
    lightning_cli(["fit", "-c", str(_config(tmp_path, tiny_teacher_files, 2, DECAY))])
    last = tmp_path / "ckpt" / "last.ckpt"
    cli = lightning_cli(["fit", "-c", str(_config(tmp_path, tiny_teacher_files, 4, DECAY)), "--ckpt_path", str(last)])
    state = torch.load(last, weights_only=True)["state_dict"]
    assert state["ema.student.n_averaged"].item() == 4
    assert not any(k.startswith("teachers.") for k in state)
    plain_state = torch.load(tmp_path / "plain" / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith("ema.") for k in plain_state)
    student_keys = [k for k in plain_state if k.startswith("student.")]
    assert all(torch.equal(plain_state[k], state[k]) for k in student_keys)  # EMA leaves training alone
    assert any(not torch.equal(state[k], state["ema.student.module." + k.removeprefix("student.")])
               for k in student_keys)
    assert cli.model.student_for("val") is cli.model.ema["student"].module
    assert "val/clip/dense_cos" in cli.trainer.callback_metrics and plain.trainer.global_step == 4

    for flag, prefix, weights in (([], "ema.student.module.", "ema"), (["--no-ema"], "student.", "raw")):
        out = tmp_path / f"export_{weights}"
        main(["export", "--ckpt", str(last), "--out", str(out), "--with-adaptors", *flag])
        assert json.loads((out / "config.json").read_text())["unitower"]["weights"] == weights
        backbone, heads = load_file(str(out / "model.safetensors")), load_file(str(out / "adaptors.safetensors"))
        for key, value in backbone.items():
            assert torch.equal(value, state[f"{prefix}model.{key}"]), key
        for key, value in heads.items():
            assert torch.equal(value, state[f"{prefix}heads.{key}"]), key


def test_checkpoints_with_and_without_ema_load_into_either_module(tiny_teacher_files):
    """(LightningCLI resumes with the checkpoint's own hyperparameters; a module built by hand may differ.) A state
    without EMA entries loads into a module with EMA (the EMA starts afresh), and EMA entries into one without."""
    torch.manual_seed(0)
    with_ema, plain = make_module(tiny_teacher_files, ema_decay=DECAY), make_module(tiny_teacher_files)
    train_steps(with_ema, torch.rand(4, 3, 32, 32), 2)
    for source, target in ((plain, with_ema), (with_ema, plain)):
        checkpoint = {"state_dict": dict(source.state_dict())}
        source.on_save_checkpoint(checkpoint)
        target.on_load_checkpoint(checkpoint)
        target.load_state_dict(checkpoint["state_dict"])  # strict
        assert all(torch.equal(v, source.student.state_dict()[k]) for k, v in target.student.state_dict().items())
    assert with_ema.ema["student"].n_averaged.item() == 0 and with_ema.student_for("val") is with_ema.student
