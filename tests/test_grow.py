"""Growing a student (model.init_from) and C-RADIOv4's loss options inside DistillModule, on tiny teachers."""

import pytest
import torch

from distill.grow import init_student_from, load_student
from distill.model import StudentModel
from distill.module import DistillModule
from tiny_teachers import tiny_teacher_set

STUDENT_ARGS = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}


def teachers(files, names):
    return tiny_teacher_set(files, names)


def module(files, names=("clip", "dino"), model_args=STUDENT_ARGS, summary=("clip", "dino"), registers=2, **kw):
    student = StudentModel("vit_small_patch16_224", list(summary), num_registers=registers, img_size=32, model_args=model_args)
    m = DistillModule(student, teachers(files, names), adaptor_hidden_dim=64, **kw)
    m.log = lambda *a, **k: None  # no trainer attached
    return m


@pytest.fixture(scope="module")
def source(tiny_teacher_files, tmp_path_factory):
    """A CLIP+DINO module (weights perturbed off its init) and its export folder + a checkpoint file of it."""
    torch.manual_seed(0)
    m = module(tiny_teacher_files)
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(torch.randn_like(p))
    root = tmp_path_factory.mktemp("grow")
    export = m.student.export(root / "export", with_adaptors=True)
    ckpt = root / "last.ckpt"
    state = {k: v for k, v in m.state_dict().items() if not k.startswith("teachers.")}
    torch.save({"state_dict": state, "unitower": m.export_metadata()}, ckpt)
    return m, export, ckpt


@pytest.mark.parametrize("kind", ["export", "checkpoint"])
def test_init_from_loads_backbone_and_heads_exactly_and_adds_new_head(tiny_teacher_files, source, kind):
    src, export, ckpt = source
    torch.manual_seed(1)
    grown = module(tiny_teacher_files, names=("clip", "dino", "sam"), init_from=str(export if kind == "export" else ckpt))
    assert grown.grown.loaded == ["clip", "dino"] and grown.grown.new == ["sam"]
    mine, theirs = grown.student.state_dict(), src.student.state_dict()
    for key, value in theirs.items():
        assert torch.equal(mine[key], value), key
    assert "sam" in grown.student.heads
    fresh = module(tiny_teacher_files, names=("clip", "dino", "sam"))
    assert grown.student.heads["sam"].dense.net[0].weight.shape == fresh.student.heads["sam"].dense.net[0].weight.shape
    loss = grown.teacher_losses(torch.rand(2, 3, 32, 32), "train")
    loss.backward()
    assert grown.student.heads["sam"].dense.net[0].weight.grad is not None  # the new teacher trains


def test_init_from_errors_name_the_key_and_both_values(tiny_teacher_files, source):
    _, export, ckpt = source
    with pytest.raises(ValueError, match=r"model_args.embed_dim=48 .* has 64"):
        module(tiny_teacher_files, model_args={**STUDENT_ARGS, "embed_dim": 64}, init_from=str(export))
    with pytest.raises(ValueError, match=r"model_args.reg_tokens=3 .* has 2"):
        module(tiny_teacher_files, registers=1, init_from=str(ckpt))
    with pytest.raises(ValueError, match=r"summary_names \['clip', 'dino'\] must be the start"):
        module(tiny_teacher_files, names=("dino", "clip"), summary=("dino", "clip"), init_from=str(export))
    with pytest.raises(ValueError, match=r"teacher 'clip' differs in 'hidden_dim': source 64, configured 32"):
        student = StudentModel("vit_small_patch16_224", ["clip", "dino"], num_registers=2, img_size=32, model_args=STUDENT_ARGS)
        DistillModule(student, teachers(tiny_teacher_files, ("clip", "dino")), adaptor_hidden_dim=32, init_from=str(export))
    with pytest.raises(FileNotFoundError, match="model.init_from: .*nowhere does not exist"):
        load_student(export.parent / "nowhere")


def test_a_new_summary_teacher_takes_a_register_token(tiny_teacher_files, source):
    """summary_names [clip, dino] + 2 registers -> [clip, dino, dino2] + 1 register: same prefix tokens, loads."""
    src, export, _ = source
    student = StudentModel("vit_small_patch16_224", ["clip", "dino", "dino2"], num_registers=1, img_size=32, model_args=STUDENT_ARGS)
    student.add_adaptor("clip", 24, 32, 64)
    report = init_student_from(student, export)
    assert report.loaded == ["clip"] and torch.equal(student.model.reg_token, src.student.model.reg_token)


def test_teacher_cache_subset_runs_the_other_teachers_online(tiny_teacher_files):
    """Cached targets for clip only: clip is never run, dino and sam are."""
    torch.manual_seed(0)
    m = module(tiny_teacher_files, names=("clip", "dino", "sam"))
    images = torch.rand(2, 3, 32, 32)
    full = m.teacher_targets(images)
    cached = {"clip": {"summary": full["clip"].summary, "dense": full["clip"].dense}}
    m.teachers[0].targets = lambda images: (_ for _ in ()).throw(AssertionError("clip ran online"))
    mixed = m.teacher_losses(images, "train", cached)
    del m.teachers[0].targets
    assert mixed.item() == pytest.approx(m.teacher_losses(images, "train").item(), rel=1e-5)


def test_shift_std_zero_is_the_plain_loss_and_shifts_train(tiny_teacher_files):
    torch.manual_seed(0)
    plain = module(tiny_teacher_files, names=("clip", "dino"))
    torch.manual_seed(0)
    still = module(tiny_teacher_files, names=("clip", "dino"), shift_equivariant=True, shift_std=0.0)
    images = torch.rand(2, 3, 32, 32)
    assert still.teacher_losses(images, "train").item() == pytest.approx(plain.teacher_losses(images, "train").item(), rel=1e-6)
    torch.manual_seed(0)
    shifted = module(tiny_teacher_files, names=("clip", "dino"), shift_equivariant=True, shift_std=1.0)
    pixels = shifted.view_shifts(images, None, ["clip", "dino"], None)["pixels"]
    assert set(pixels) == {"student", "clip", "dino"} and any(any(v) for v in pixels.values())  # std 1: step 0 draws a shift
    assert all(px % 8 == 0 for view in pixels.values() for px in view)  # whole student patches (8 px)
    loss = shifted.teacher_losses(images, "train")
    loss.backward()
    assert torch.isfinite(loss)
    assert shifted.teacher_losses(images, "val").item() == pytest.approx(plain.teacher_losses(images, "val").item(), rel=1e-6)


def test_shifted_cached_targets_keep_the_teacher_view_unshifted(tiny_teacher_files):
    torch.manual_seed(0)
    m = module(tiny_teacher_files, names=("clip", "dino"), shift_equivariant=True, shift_std=2.0)
    images = torch.rand(2, 3, 32, 32)
    cached = {"clip": {"summary": torch.randn(2, 24), "dense": torch.randn(2, 32, 4, 4)}}
    pixels = m.view_shifts(images, None, ["clip", "dino"], cached)["pixels"]
    assert pixels["clip"] == (0, 0)
    assert torch.isfinite(m.teacher_losses(images, "train", cached))


def test_angle_balanced_summary_loss_option(tiny_teacher_files):
    torch.manual_seed(0)
    m = module(tiny_teacher_files, names=("clip", "dino"), summary_loss="angle_balanced")
    images = torch.rand(4, 3, 32, 32)
    out = m.student(images)
    target = m.teacher_targets(images)["clip"].summary
    from distill.losses_radio4 import summary_angle_balanced
    assert m._summary_loss(out.adaptors["clip"].summary, target).item() == pytest.approx(
        summary_angle_balanced(out.adaptors["clip"].summary, target).item())
    with pytest.raises(ValueError, match="summary_loss must be one of"):
        module(tiny_teacher_files, summary_loss="angle")


def test_init_from_keeps_loaded_mse_statistics_and_calibrates_only_new_heads(tiny_teacher_files, tmp_path):
    torch.manual_seed(0)
    src = module(tiny_teacher_files, dense_loss="mse")
    src.calibrate([torch.rand(4, 3, 32, 32)])
    export = src.student.export(tmp_path / "mse", with_adaptors=True)
    grown = module(tiny_teacher_files, names=("clip", "dino", "sam"), dense_loss="mse", init_from=str(export))
    assert grown.student.heads["clip"].norm.fitted and not grown.student.heads["sam"].norm.fitted
    grown.calibrate([torch.rand(4, 3, 32, 32)])  # other images: loaded statistics must not move
    for name in ("clip", "dino"):
        for key, value in src.student.heads[name].norm.state_dict().items():
            assert torch.equal(grown.student.heads[name].norm.state_dict()[key], value), (name, key)
    assert grown.student.heads["sam"].norm.fitted
