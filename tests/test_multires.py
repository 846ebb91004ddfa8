"""Issue 12 item 4: multi-resolution student batches, CPE position embeddings, per-resolution validation.

    PYTHONPATH=$PWD python -m pytest -q tests/test_multires.py            # fast tests
    PYTHONPATH=$PWD python -m pytest -q -m slow tests/test_multires.py    # + kill -9 resume with both options
"""

from __future__ import annotations

import random

import pytest
import timm
import torch
import yaml

from distill.encoders import OpenClipEncoder, SamEncoder, TimmEncoder
from distill.encoders.resize import normalize, resize
from distill.model import StudentModel
from distill.module import DistillModule
from distill.teacher import Teacher

STUDENT_ARGS = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}


def make_student(cpe_max_grid: int | None = None, img_size: int = 32) -> StudentModel:
    return StudentModel("vit_small_patch16_224", ["clip", "dino"], num_registers=2, img_size=img_size,
                        model_args=STUDENT_ARGS, cpe_max_grid=cpe_max_grid)


def make_module(files, cpe_max_grid: int | None = None, **kwargs) -> DistillModule:
    teachers = [
        Teacher("clip", OpenClipEncoder(f"local-dir:{files['clip']}")),
        Teacher("dino", TimmEncoder(f"local-dir:{files['dino']}", crop_pct=1.0)),
        Teacher("sam", SamEncoder("tiny", str(files["sam"]))),
    ]
    module = DistillModule(make_student(cpe_max_grid), teachers, adaptor_hidden_dim=32, **kwargs)
    module.logged = {}
    module.log = lambda key, value, **k: module.logged.__setitem__(key, value.detach().clone())
    return module


# ---------------------------------------------------------------- resolution per step


def test_resolution_choice_is_deterministic_and_covers_the_set(tiny_teacher_files):
    sizes = [16, 24, 32, 40]
    a = make_module(tiny_teacher_files, student_resolutions=sizes)
    b = make_module(tiny_teacher_files, student_resolutions=sizes)
    torch.manual_seed(123)  # the draw must not depend on the global generator ...
    first = [a.student_resolution(step) for step in range(200)]
    state = torch.get_rng_state()
    torch.manual_seed(7)
    assert [b.student_resolution(step) for step in range(200)] == first
    torch.set_rng_state(state)
    assert [a.student_resolution(step) for step in range(200)] == first
    assert torch.equal(torch.get_rng_state(), state)  # ... nor move it
    counts = {s: first.count(s) for s in sizes}
    assert set(first) == set(sizes) and min(counts.values()) >= 30, counts  # every size, roughly uniform
    other = make_module(tiny_teacher_files, student_resolutions=sizes, resolution_seed=1)
    assert [other.student_resolution(step) for step in range(200)] != first
    assert make_module(tiny_teacher_files).student_resolution(5) is None  # default: no resizing


def test_resolutions_must_be_multiples_of_the_patch(tiny_teacher_files):
    with pytest.raises(ValueError, match="student_resolutions: 30 .*patch size 8"):
        make_module(tiny_teacher_files, student_resolutions=[32, 30])
    with pytest.raises(ValueError, match="val_resolutions: 12"):
        make_module(tiny_teacher_files, val_resolutions=[12])


@pytest.mark.parametrize("size", [16, 24, 32, 48])
def test_student_gets_the_chosen_size_and_teachers_the_crop(tiny_teacher_files, size):
    module = make_module(tiny_teacher_files, student_resolutions=[16, 24, 32, 48])
    module.student_resolution = lambda step: size  # the size of this step
    seen = {}
    module.student.register_forward_pre_hook(lambda m, args: seen.__setitem__("student", args[0].clone()))
    for t in module.teachers:
        t.encoder.register_forward_pre_hook(lambda m, args, n=t.name: seen.__setitem__(n, tuple(args[0].shape)))
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    loss = module.teacher_losses(images, "train")
    assert seen["student"].shape == (2, 3, size, size)
    assert {seen[n] for n in ("clip", "dino", "sam")} == {(2, 3, 32, 32)}  # teachers: the crop as before
    expected = images if size == 32 else resize(images, (size, size), "bicubic")
    assert torch.equal(seen["student"], expected)
    assert torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("stage", ["train", "val"])
def test_student_size_downsamples_a_high_resolution_teacher_view(tiny_teacher_files, stage):
    """student_size: the data's crop is the teachers' view (each teacher resizes it to its own input, SAM keeps
    its detail); the student sees the crop resized to student_size, in training and validation alike."""
    module = make_module(tiny_teacher_files, student_size=16)
    seen = {}
    module.student.register_forward_pre_hook(lambda m, args: seen.setdefault("student", args[0].clone()))
    for t in module.teachers:
        t.encoder.register_forward_pre_hook(lambda m, args, n=t.name: seen.__setitem__(n, tuple(args[0].shape)))
    torch.manual_seed(0)
    images = torch.rand(2, 3, 48, 48)  # a teachers' view 3x the student's side
    with torch.set_grad_enabled(stage == "train"):
        loss = module.teacher_losses(images, stage)
    assert torch.equal(seen["student"], resize(images, (16, 16), "bicubic"))
    assert {seen[n] for n in ("clip", "dino", "sam")} == {(2, 3, 48, 48)}
    sam = module.teachers[2].encoder
    assert module.teacher_targets(images, ["sam"])["sam"].dense.shape[-2:] == sam(images).dense.shape[-2:]
    assert torch.isfinite(loss)
    # a per-step resolution still wins in training
    multi = make_module(tiny_teacher_files, student_size=16, student_resolutions=[24])
    seen.clear()
    multi.student.register_forward_pre_hook(lambda m, args: seen.setdefault("student", args[0].clone()))
    with torch.set_grad_enabled(stage == "train"):
        multi.teacher_losses(images, stage)
    assert seen["student"].shape[-1] == (24 if stage == "train" else 16)
    with pytest.raises(ValueError, match="student_size: 20 is not a positive multiple"):
        make_module(tiny_teacher_files, student_size=20)


def test_default_and_same_size_losses_are_identical(tiny_teacher_files):
    """Unset options = the old path; a resolution set holding only the crop size resizes nothing, so the
    loss and every gradient are bit-identical to the default module's."""
    torch.manual_seed(0)
    default = make_module(tiny_teacher_files)
    torch.manual_seed(0)
    same = make_module(tiny_teacher_files, student_resolutions=[32])
    images = torch.rand(3, 3, 32, 32)
    a, b = default.teacher_losses(images, "train"), same.teacher_losses(images, "train")
    assert torch.equal(a, b)
    a.backward()
    b.backward()
    for (name, p), q in zip(default.student.named_parameters(), same.student.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_validation_logs_cosines_per_resolution(tiny_teacher_files):
    module = make_module(tiny_teacher_files, student_resolutions=[16, 32], val_resolutions=[16, 24, 32]).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        module.validation_step(torch.rand(2, 3, 32, 32), 0)
    for teacher in ("clip", "dino", "sam"):
        assert f"val/{teacher}/dense_cos" in module.logged  # the key downstream readers use stays
        for size in (16, 24, 32):
            assert f"val/{teacher}/dense_cos@{size}" in module.logged
        # at the crop's own size the per-resolution cosine is the plain one
        assert torch.equal(module.logged[f"val/{teacher}/dense_cos@32"], module.logged[f"val/{teacher}/dense_cos"])
        assert module.logged[f"val/{teacher}/dense_cos@16"] != module.logged[f"val/{teacher}/dense_cos"]
    assert "val/clip/summary_cos@24" in module.logged and "val/sam/summary_cos@24" not in module.logged
    # val_resolutions defaults to student_resolutions; nothing extra without either
    plain = make_module(tiny_teacher_files, student_resolutions=[16])
    assert plain.validation_resolutions() == [16]
    assert make_module(tiny_teacher_files).validation_resolutions() == []


# ---------------------------------------------------------------- CPE


def _grid(student: StudentModel) -> torch.Tensor:
    g = student.cpe_max_grid
    return student.model.pos_embed.detach()[0, student.model.num_prefix_tokens :].reshape(g, g, -1)


def _training_windows(student: StudentModel, seed: int, batch: int = 8, grid: int = 4) -> list[tuple[int, int]]:
    """Run the CPE `_pos_embed` on zero patch tokens in training mode and find, per sample, the (y, x) window of
    the stored grid that was added (exactly one must match bit for bit)."""
    vit = student.model.train()
    torch.manual_seed(seed)
    with torch.no_grad():
        out = vit._pos_embed(torch.zeros(batch, grid, grid, student.embed_dim))
    prefix = vit.num_prefix_tokens
    # prefix tokens: their own tokens + their position entries, as timm does
    expected_prefix = torch.cat([vit.cls_token, vit.reg_token], 1) + vit.pos_embed[:, :prefix]
    assert torch.equal(out[:, :prefix], expected_prefix.expand(batch, -1, -1))
    full, size = _grid(student), student.cpe_max_grid
    offsets = []
    for sample in out[:, prefix:]:
        hits = [(y, x) for y in range(size - grid + 1) for x in range(size - grid + 1)
                if torch.equal(sample, full[y : y + grid, x : x + grid].reshape(grid * grid, -1))]
        assert len(hits) == 1, hits
        offsets.append(hits[0])
    return offsets


def test_cpe_training_adds_random_windows_of_the_grid():
    torch.manual_seed(0)
    student = make_student(cpe_max_grid=7)
    assert student.model.pos_embed.shape == (1, student.model.num_prefix_tokens + 49, 48)
    first = _training_windows(student, seed=1)
    assert _training_windows(student, seed=1) == first  # seeded from torch's global generator
    second = _training_windows(student, seed=2)
    assert second != first
    assert len(set(first + second)) > 4  # offsets vary per sample, not once per batch
    # the window follows the token grid: a 3 x 3 grid gets 3 x 3 windows
    assert all(0 <= y <= 4 and 0 <= x <= 4 for y, x in _training_windows(student, seed=3, grid=3))


def test_cpe_gradient_reaches_only_the_window():
    torch.manual_seed(0)
    student = make_student(cpe_max_grid=6).train()
    torch.manual_seed(5)
    out = student.model._pos_embed(torch.zeros(1, 4, 4, student.embed_dim))
    out.sum().backward()
    grad = student.model.pos_embed.grad[0, student.model.num_prefix_tokens :].reshape(6, 6, -1)
    touched = grad.abs().sum(-1) > 0
    assert touched.sum() == 16  # one 4 x 4 window of the 6 x 6 grid
    y, x = [int(i.min()) for i in touched.nonzero(as_tuple=True)]
    assert touched[y : y + 4, x : x + 4].all()


def _plain_with_pos(student: StudentModel, pos_embed: torch.Tensor, img_size: int) -> torch.nn.Module:
    """A timm ViT without CPE, built like the student at img_size, holding the student's weights and `pos_embed`."""
    plain = timm.create_model("vit_small_patch16_224", **{**student.model_args, "img_size": img_size})
    plain.load_state_dict({**student.model.state_dict(), "pos_embed": pos_embed})
    return plain.eval()


@pytest.mark.parametrize(("size", "offset"), [(32, 1), (24, 1), (16, 2), (48, 0)])
def test_cpe_eval_uses_the_centre_window(size, offset):
    """Eval: the centre (grid - n) // 2 window of the 6 x 6 grid for an n x n token grid (n <= 6)."""
    torch.manual_seed(0)
    student = make_student(cpe_max_grid=6).eval()
    n, prefix = size // 8, student.model.num_prefix_tokens
    window = _grid(student)[offset : offset + n, offset : offset + n].reshape(1, n * n, -1)
    plain = _plain_with_pos(student, torch.cat([student.model.pos_embed.detach()[:, :prefix], window], 1), size)
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        expected = plain.forward_features(normalize(images, student.conditioner.mean, student.conditioner.std))
        assert torch.equal(student(images).tokens, expected)


def test_cpe_eval_beyond_the_grid_resamples_it():
    """A token grid larger than the stored one: the whole grid resampled like timm resamples its own."""
    torch.manual_seed(0)
    student = make_student(cpe_max_grid=6).eval()
    plain = _plain_with_pos(student, student.model.pos_embed.detach(), 48)  # timm: 6 x 6 grid at 48 px
    images = torch.rand(2, 3, 64, 64)  # 8 x 8 tokens
    with torch.no_grad():
        expected = plain.forward_features(normalize(images, student.conditioner.mean, student.conditioner.std))
        torch.testing.assert_close(student(images).tokens, expected, rtol=0, atol=1e-6)


def test_cpe_needs_a_grid_at_least_the_default():
    with pytest.raises(ValueError, match="cpe_max_grid=3 is smaller than the default patch grid 4"):
        make_student(cpe_max_grid=3)


def test_cpe_export_loads_in_plain_timm_and_round_trips(tmp_path):
    torch.manual_seed(0)
    student = make_student(cpe_max_grid=6)
    student.add_adaptor("clip", 24, 24, hidden_dim=16)
    with torch.no_grad():  # a trained-looking grid, not the init
        student.model.pos_embed.add_(torch.randn_like(student.model.pos_embed))
    student.eval()
    student.export(tmp_path / "exp")
    images = torch.rand(2, 3, 32, 32)
    plain = timm.create_model(f"local-dir:{tmp_path / 'exp'}", pretrained=True).eval()
    assert plain.pos_embed.shape[1] == plain.num_prefix_tokens + 16  # the default 4 x 4 grid
    with torch.no_grad():
        ours = student(images).tokens
        theirs = plain.forward_features(normalize(images, student.conditioner.mean, student.conditioner.std))
    assert torch.equal(ours, theirs)
    # from_export restores the whole grid: same features at every size, training windows too
    loaded = StudentModel.from_export(tmp_path / "exp").eval()
    assert loaded.cpe_max_grid == 6 and torch.equal(loaded.model.pos_embed, student.model.pos_embed)
    with torch.no_grad():
        for size in (16, 32, 48, 64):
            x = torch.rand(1, 3, size, size)
            assert torch.equal(loaded(x).adaptors["clip"].dense, student(x).adaptors["clip"].dense)
    # the checkpoint path: config() rebuilds the same model
    rebuilt = StudentModel(**student.config())
    rebuilt.add_adaptor("clip", 24, 24, hidden_dim=16)
    rebuilt.load_state_dict(student.state_dict())  # strict: same keys and shapes (the 6 x 6 grid)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(images).tokens, ours)


def test_default_student_has_no_cpe():
    torch.manual_seed(0)
    student = make_student()
    assert student.config()["cpe_max_grid"] is None and "cpe_max_grid" not in student.token_layout()
    assert "_pos_embed" not in vars(student.model)  # timm's own method
    assert student.plain_backbone() is student.model


# ---------------------------------------------------------------- recipe and exact resume


def test_multires_overlay_fits_the_toy_student():
    """configs/distill/overlays/toy_multires.yaml on configs/distill/toy.yaml: the CPE grid covers the largest
    resolution and every resolution is a multiple of the patch (tests/test_configs.py checks that the overlay
    changes nothing else)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs/distill"
    base, overlay = (yaml.safe_load((root / name).read_text()) for name in ("toy.yaml", "overlays/toy_multires.yaml"))
    sizes, grid = overlay["model"]["student_resolutions"], overlay["model"]["student"]["init_args"]["cpe_max_grid"]
    patch = base["model"]["student"]["init_args"]["model_args"]["patch_size"]
    assert grid * patch >= max(sizes) and all(s % patch == 0 for s in sizes)
    assert base["data"]["image_size"] in sizes


@pytest.mark.slow
def test_kill9_resume_is_bit_identical_with_multires_and_cpe(tmp_path):
    """tests/test_resume.py's distill check with student_resolutions and cpe_max_grid on (both draw randomness)."""
    import test_resume as tr

    def make(root, ids, workers):
        path = tr.distill_config(root, ids, workers)
        cfg = yaml.safe_load(path.read_text())
        cfg["model"].update(student_resolutions=[32, 48, 64])
        cfg["model"]["student"]["init_args"]["cpe_max_grid"] = 10
        path.write_text(yaml.safe_dump(cfg))
        return path

    ref_ids = tmp_path / "ref_ids.txt"
    tr._run(tr._command("distill", make(tmp_path / "ref", ref_ids, 0)))
    kill_step = random.randrange(tr.EVERY + 1, tr.STEPS - 1)
    killed_ids, resumed_ids = tmp_path / "killed_ids.txt", tmp_path / "resumed_ids.txt"
    tr._run_and_kill(tr._command("distill", make(tmp_path / "run", killed_ids, 0)), killed_ids, kill_step)
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    tr._run(tr._command("distill", make(tmp_path / "run", resumed_ids, 0), "--ckpt_path", str(last)))
    expected, final = tr._weights(tmp_path / "ref" / "ckpt" / "last.ckpt"), tr._weights(last)
    assert expected.keys() == final.keys()
    assert final["student.model.pos_embed"].shape[1] == 4 + 100
    diff = max((expected[k].float() - final[k].float()).abs().max().item() for k in expected)
    assert all(torch.equal(expected[k], final[k]) for k in expected), f"killed at {kill_step}: max abs diff {diff}"
    print(f"multires+cpe: killed at step {kill_step}, max abs diff {diff}")
