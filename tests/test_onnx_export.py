"""ONNX export of the student (distill/onnx_export.py, `unitower distill export --onnx`): onnxruntime gives the
PyTorch student's outputs (max abs diff <= 1e-4) at two resolutions and another batch size than the export's
example, with and without adaptor heads and with a CPE student; errors are one line naming what to do.

    python -m pytest -q -p no:cacheprovider tests/test_onnx_export.py

Skipped when onnxruntime / onnx / onnxscript are missing (the `onnx` extra; the `test` extra installs them).
"""

from __future__ import annotations

import torch
import pytest

onnxruntime = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from distill.model import StudentModel  # noqa: E402
from distill.onnx_export import ONNX_FILE, compare_onnx, export_onnx  # noqa: E402
from test_student_model import ARGS, MEAN, STD, make_model  # noqa: E402

TOLERANCE = 1e-4
SIZES = [(32, 32), (48, 24)]  # the export's img_size and a non-square one (dynamic H and W)


def write_checkpoint(model: StudentModel, path) -> None:
    """A checkpoint as DistillModule writes it (student + heads state, 'unitower' metadata), without a run."""
    meta = {"student": model.config(), "heads": model.adaptors_config(), "dense_loss": "mse",
            "dense_norm": "channel_standardizer", "teachers": {"clip": {}, "sam": {}}}
    torch.save({"state_dict": {f"student.{k}": v for k, v in model.state_dict().items()}, "unitower": meta}, path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A student with two adaptor heads (one without a summary; mse normalizers) exported with its heads."""
    model = make_model(normalizer="channel_standardizer")
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / ONNX_FILE, with_adaptors=True)
    return model, path


def test_onnxruntime_matches_pytorch_at_two_resolutions(exported):
    model, path = exported
    diffs = compare_onnx(model, path, SIZES, batch=3, with_adaptors=True)  # the export's example had batch 2
    print("ONNX max abs diff:", diffs, f"file {path.stat().st_size} bytes")
    assert set(diffs) == {"32x32", "48x24"} and max(diffs.values()) <= TOLERANCE, diffs


def test_named_outputs_dynamic_axes_and_metadata(exported):
    model, path = exported
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == ["tokens", "dense", "summary.clip", "summary.dino", "adaptors.clip.summary", "adaptors.clip.dense",
                     "adaptors.sam.dense"]  # sam has no summary head
    (images,) = session.get_inputs()
    assert images.name == "images" and images.shape[1] == 3 and all(isinstance(d, str) for d in images.shape[::2])
    out = dict(zip(names, session.run(None, {"images": torch.rand(1, 3, 40, 16).numpy()})))
    assert out["dense"].shape == (1, 48, 5, 2) and out["adaptors.clip.dense"].shape == (1, 20, 5, 2)
    assert out["tokens"].shape == (1, 4 + 10, 48) and out["adaptors.clip.summary"].shape == (1, 24)
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert '"summary_names": ["clip", "dino"]' in meta["unitower"] and '"patch_size": 8' in meta["unitower"]
    assert not [f for f in path.parent.iterdir() if f.name.endswith(".tmp")]  # written through atomic_write


def test_backbone_only_and_cpe_students(tmp_path):
    torch.manual_seed(0)
    model = StudentModel("vit_small_patch16_224", ["clip"], img_size=32, mean=MEAN, std=STD, model_args=ARGS,
                         cpe_max_grid=6).eval()
    path = export_onnx(model, tmp_path / ONNX_FILE)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["tokens", "dense", "summary.clip"]
    diffs = compare_onnx(model, path, [(32, 32), (48, 40)])  # CPE: up to 6 x 6 patches
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_cli_writes_and_checks_the_onnx_file(tmp_path, capsys):
    from distill.cli import main

    write_checkpoint(make_model(normalizer="channel_standardizer"), tmp_path / "last.ckpt")
    main(["export", "--ckpt", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "export"), "--onnx"])
    out = capsys.readouterr().out
    assert (tmp_path / "export" / ONNX_FILE).is_file() and (tmp_path / "export" / "model.safetensors").is_file()
    assert "onnxruntime vs PyTorch, max abs diff:" in out and "at 32x32" in out and "at 48x32" in out, out
    figures = [float(part.split(" at ")[0]) for part in out.split("max abs diff: ")[1].split(", ")]
    assert max(figures) <= TOLERANCE


def test_missing_packages_and_unsupported_models_are_one_line_errors(tmp_path, monkeypatch, capsys):
    import distill.onnx_export as onnx_export
    from mllm.command import main

    monkeypatch.chdir(tmp_path)
    write_checkpoint(make_model(normalizer="channel_standardizer"), tmp_path / "last.ckpt")
    monkeypatch.setattr(onnx_export, "EXPORT_PACKAGES", ("onnx", "onnxscript_not_installed"))
    with pytest.raises(SystemExit) as stop:
        main(["distill", "export", "--ckpt", "last.ckpt", "--out", "export", "--onnx"])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and len(err.strip().splitlines()) == 1 and not (tmp_path / "export").exists()
    assert "error: --onnx needs the packages onnx and onnxscript_not_installed (missing: onnxscript_not_installed)" in err
    assert 'pip install "unitower[onnx]"' in err
    monkeypatch.setattr(onnx_export, "EXPORT_PACKAGES", ("onnx", "onnxscript"))

    def unsupported(*args, **kwargs):
        raise RuntimeError("Unsupported FX nodes: {'call_function': ['aten.fancy_op']}.\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    with pytest.raises(SystemExit):
        main(["distill", "export", "--ckpt", "last.ckpt", "--out", "export", "--onnx", "--with-adaptors"])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert ("ONNX export of student 'vit_small_patch16_224' with adaptors failed in torch.onnx.export (RuntimeError: "
            "Unsupported FX nodes: {'call_function': ['aten.fancy_op']}.)") in err
    assert (tmp_path / "export" / "model.safetensors").is_file() and not (tmp_path / "export" / ONNX_FILE).exists()
