"""Bad input to the encoder wrappers fails early with a message naming the file / key / name and a fix.

Run: /work/venv/bin/pytest tests/test_encoders_errors.py -q
"""

from __future__ import annotations

import pytest
import torch

from distill.encoders import OpenClipEncoder, SamEncoder, TimmEncoder, build_sam, tiny


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
