"""Bad input to the encoder wrappers fails early with a message naming the file / key / name and a fix.

Run: /work/venv/bin/pytest tests/test_encoders_errors.py -q
"""

from __future__ import annotations

import pytest
import torch

import tiny_teachers as tiny
from distill.encoders import OpenClipEncoder, SamEncoder, TimmEncoder, build_sam


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return {
        "clip_name": tiny.register_open_clip_config(root / "clip_cfg"),
        "vit": tiny.write_timm_state_dict(root / "vit.pth"),
        "vit_reg4": tiny.write_timm_state_dict(root / "vit_reg4.pth", reg_tokens=4),
        "sam": tiny.write_sam_state_dict(root / "sam.pth"),
        "root": root,
    }


# ---------------------------------------------------------------- missing files


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h", "tiny"])
def test_sam_missing_checkpoint(tmp_path, variant):
    missing = tmp_path / f"sam_{variant}.pth"
    with pytest.raises(FileNotFoundError, match=f"sam_{variant}.pth' does not exist"):
        build_sam(variant, str(missing))


def test_timm_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth' does not exist"):
        TimmEncoder(tiny.TINY_VIT_NAME, checkpoint=str(tmp_path / "nowhere.pth"))


def test_open_clip_missing_pretrained_file(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt' is neither a local file nor a known tag"):
        OpenClipEncoder(files["clip_name"], pretrained=str(tmp_path / "nowhere.pt"))


@pytest.mark.parametrize("make", [lambda d: OpenClipEncoder("local-dir:" + d), lambda d: TimmEncoder("local-dir:" + d)])
def test_missing_local_dir(tmp_path, make):
    with pytest.raises(FileNotFoundError, match="model folder .*gone' does not exist"):
        make(str(tmp_path / "gone"))


# ---------------------------------------------------------------- checkpoints that do not fit


def test_sam_checkpoint_of_other_model(files):
    with pytest.raises(ValueError, match=r"does not fit the architecture: \d+ missing keys .*image_encoder.*unexpected keys .*cls_token"):
        SamEncoder("tiny", checkpoint=str(files["vit"]))


def test_sam_checkpoint_of_other_variant(files, tmp_path):
    state = torch.load(files["sam"], weights_only=True)
    state["image_encoder.pos_embed"] = torch.zeros(1, 4, 4, 96)
    torch.save(state, tmp_path / "resized.pth")
    with pytest.raises(ValueError, match=r"wrong shape .*image_encoder.pos_embed: \(1, 4, 4, 96\) vs \(1, 8, 8, 96\)"):
        build_sam("tiny", str(tmp_path / "resized.pth"))


def test_timm_checkpoint_of_other_model(files):
    with pytest.raises(ValueError, match="vit_reg4.pth' do not fit the architecture.*reg_token"):
        TimmEncoder(tiny.TINY_VIT_NAME, checkpoint=str(files["vit_reg4"]))


def test_open_clip_checkpoint_of_other_model(files):
    with pytest.raises(ValueError, match=r"vit.pth' does not fit the architecture: \d+ missing keys .*visual"):
        OpenClipEncoder(files["clip_name"], pretrained=str(files["vit"]))


# ---------------------------------------------------------------- unknown names


def test_unknown_open_clip_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown open_clip model name. Close names: \[.*'ViT-B-16'"):
        OpenClipEncoder("ViT-B-61")


def test_unknown_timm_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown timm model name. Close names: \[.*'vit_base_patch16_224'"):
        TimmEncoder("vit_bsae_patch16_224")


def test_unknown_sam_variant():
    with pytest.raises(ValueError, match=r"Unknown SAM variant 'vit_x'. Choose one of \['tiny', 'vit_b', 'vit_h', 'vit_l'\]"):
        SamEncoder("vit_x")


# ---------------------------------------------------------------- bad arguments


def test_layer_out_of_range(files):
    with pytest.raises(ValueError, match="layer=4 is outside the 4 encoder blocks"):
        SamEncoder("tiny", checkpoint=str(files["sam"]), layer=4)
    with pytest.raises(ValueError, match="layer=-4 is outside its 3 blocks"):
        TimmEncoder(tiny.TINY_VIT_NAME, checkpoint=str(files["vit"]), layer=-4)


def test_images_must_be_float_bchw(files):
    encoder = SamEncoder("tiny", checkpoint=str(files["sam"]))
    with pytest.raises(ValueError, match=r"SamEncoder expects float images of shape \[B, 3, H, W\]"):
        encoder(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))


# ---------------------------------------------------------------- one safe loader for every checkpoint path


class _Payload:
    """Pickles to a call of os.system: loading it with weights_only=False would create `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def pickle_bomb(tmp_path, monkeypatch):
    """A checkpoint whose unpickling runs code, with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 set (the env var that
    turns unpickling back on for torch.load calls that do not pass weights_only)."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "bomb.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    return path, marker


def _loaders():
    from distill.common.checkpoint_io import AtomicCheckpointIO
    from distill.export import load_checkpoint as load_distill_checkpoint
    from distill.common.io import load_weights
    from mllm.evaluate import evaluate_checkpoint
    from mllm.module import load_trained_weights

    return {
        "load_weights": lambda p: load_weights(p),
        "TimmEncoder": lambda p: TimmEncoder(tiny.TINY_VIT_NAME, checkpoint=str(p)),
        "SamEncoder": lambda p: SamEncoder("tiny", checkpoint=str(p)),
        "OpenClipEncoder": lambda p: OpenClipEncoder("ViT-B-32", pretrained=str(p)),
        "mllm init_from": lambda p: load_trained_weights(None, str(p)),
        "mllm evaluate": lambda p: evaluate_checkpoint(str(p)),
        "--ckpt_path (resume)": lambda p: AtomicCheckpointIO().load_checkpoint(p),
        "distill export": lambda p: load_distill_checkpoint(p),
    }


@pytest.mark.parametrize("loader", list(_loaders()))
def test_pickle_payload_never_runs(pickle_bomb, loader):
    from distill.common.io import UnsafeCheckpointError

    path, marker = pickle_bomb
    with pytest.raises(UnsafeCheckpointError, match=r"bomb.pth' was refused because loading it would run pickled code .*posix.system"):
        _loaders()[loader](path)
    assert not marker.exists()


@pytest.mark.parametrize("loader", ["load_weights", "TimmEncoder", "SamEncoder", "mllm init_from"])
def test_unreadable_checkpoint_is_named(tmp_path, loader):
    path = tmp_path / "cut.pth"
    tiny.write_sam_state_dict(tmp_path / "full.pth")
    path.write_bytes((tmp_path / "full.pth").read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cut.pth' is not a readable torch checkpoint \(truncated or another format"):
        _loaders()[loader](path)


def test_unreadable_safetensors_is_named(tmp_path):
    from distill.common.io import load_weights

    (tmp_path / "w.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"w.safetensors' is not a readable safetensors file"):
        load_weights(tmp_path / "w.safetensors")


@pytest.mark.parametrize("loader", ["load_weights", "SamEncoder", "mllm init_from"])
def test_missing_checkpoint_is_named(tmp_path, loader):
    with pytest.raises(FileNotFoundError, match=r"checkpoint file '.*absent.pth' does not exist"):
        _loaders()[loader](tmp_path / "absent.pth")


@pytest.mark.parametrize("suffix", ["model.safetensors", "../other.pth"])
def test_timm_local_dir_with_its_own_checkpoint_loads(tmp_path, suffix):
    """A checkpoint that fits loads, also with a local-dir name (was "do not fit ... 0 missing keys, 0 unexpected keys")."""
    folder = tiny.write_timm_dir(tmp_path / "vit", seed=0)
    checkpoint = folder / suffix
    if suffix.endswith(".pth"):
        tiny.write_timm_state_dict(checkpoint, seed=1)  # other weights: the checkpoint, not the folder, must win
    expected = torch.load(checkpoint, weights_only=True) if suffix.endswith(".pth") else None
    encoder = TimmEncoder("local-dir:" + str(folder), checkpoint=str(checkpoint))
    if expected is None:
        from safetensors.torch import load_file

        expected = load_file(str(checkpoint))
    state = encoder.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items() if k in state)
    assert not torch.equal(state["pos_embed"], TimmEncoder(tiny.TINY_VIT_NAME).model.state_dict()["pos_embed"])


def test_timm_local_dir_with_checkpoint_of_other_model(tmp_path):
    folder = tiny.write_timm_dir(tmp_path / "vit")
    tiny.write_timm_state_dict(tmp_path / "reg4.pth", reg_tokens=4)
    with pytest.raises(ValueError, match=r"reg4.pth' do not fit the architecture.*1 unexpected keys \(e.g. \['reg_token'\]\)"):
        TimmEncoder("local-dir:" + str(folder), checkpoint=str(tmp_path / "reg4.pth"))


def test_lm_folder_with_pickle_payload_is_refused(tmp_path, pickle_bomb):
    from distill.common.io import UnsafeCheckpointError
    from mllm.loading import load_lm
    from tiny_llava import write_tiny_lm

    path, marker = pickle_bomb
    folder = write_tiny_lm(tmp_path / "lm", steps=1)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    (folder / "pytorch_model.bin").write_bytes(path.read_bytes())
    with pytest.raises(UnsafeCheckpointError, match=r"LM '.*lm': '.*pytorch_model.bin' was refused because loading it would run pickled code"):
        load_lm(str(folder))
    assert not marker.exists()
