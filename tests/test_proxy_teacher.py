"""Proxy teachers (issue 19 item 4): an export with adaptors as the teachers of a second distillation
(configs/distill/toy_proxy.yaml); the proxy's backbone runs once per batch for all of its teacher spaces."""

from pathlib import Path

import pytest
import torch
import yaml

from distill.exported import SharedStudent, StudentEncoder
from distill.model import StudentModel
from distill.module import DistillModule
from distill.teacher import Teacher
from recipe_fit import fit_two_steps

ROOT = Path(__file__).resolve().parents[1]
ARGS = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
HEADS = {"clip": (16, 24), "dino": (12, 20), "sam": (None, 12)}


@pytest.fixture(scope="module")
def proxy_export(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    proxy = StudentModel("vit_small_patch16_224", ["clip", "dino"], num_registers=1, img_size=64, model_args=ARGS)
    for name, (summary, dense) in HEADS.items():
        proxy.add_adaptor(name, summary, dense, hidden_dim=16)
    return proxy.export(tmp_path_factory.mktemp("proxy") / "export")


def proxy_teachers(path: Path, share: bool = True) -> list[Teacher]:
    return [Teacher(name, StudentEncoder(str(path), adaptors=[name], share_backbone=share)) for name in HEADS]


def test_one_backbone_pass_serves_every_teacher_space(proxy_export):
    teachers = proxy_teachers(proxy_export)
    shared = SharedStudent.of(str(proxy_export))
    assert all(t.encoder.shared is shared for t in teachers)  # loaded once
    passes = []
    shared.student.model.patch_embed.register_forward_hook(lambda *a: passes.append(1))
    student = StudentModel("vit_small_patch16_224", ["clip", "dino"], img_size=64, model_args={**ARGS, "embed_dim": 16})
    module = DistillModule(student, teachers, adaptor_hidden_dim=16)
    module.log = lambda *a, **k: None
    for batch in range(2):
        module.teacher_losses(torch.rand(2, 3, 64, 64), "train").backward()
        assert len(passes) == batch + 1  # three teachers, one proxy backbone pass per batch
    images = torch.rand(2, 3, 64, 64)
    separate = proxy_teachers(proxy_export, share=False)  # each loads and runs the export on its own
    for one, other in zip(teachers, separate):
        a, b = one.targets(images), other.targets(images)
        torch.testing.assert_close(a.dense, b.dense)
        assert (a.summary is None) == (b.summary is None) == (one.name == "sam")
        assert a.dense.shape[1] == HEADS[one.name][1]


def test_share_backbone_needs_adaptors(proxy_export):
    with pytest.raises(ValueError, match="share_backbone needs adaptors"):
        StudentEncoder(str(proxy_export), share_backbone=True)


def test_proxy_recipe_fits(proxy_export, tmp_path):
    """configs/distill/toy_proxy.yaml, shrunk (tiny student, 2 steps, no benchmarks), on the proxy export."""
    config = yaml.safe_load((ROOT / "configs" / "distill" / "toy_proxy.yaml").read_text())
    for teacher in config["model"]["teachers"]:
        assert teacher["init_args"]["encoder"]["init_args"]["share_backbone"] is True
        teacher["init_args"]["encoder"]["init_args"]["path"] = str(proxy_export)
    config["model"]["student"]["init_args"]["model_args"] = {**ARGS, "embed_dim": 16}
    config["model"].update(warmup_steps=1, adaptor_hidden_dim=16)
    cli = fit_two_steps(config, tmp_path, callbacks=[], logger=False)
    assert {"val/clip/dense_cos", "val/dino/summary_cos", "val/sam/dense_cos"} <= set(cli.trainer.callback_metrics)
