"""Encoder wrappers vs. their libraries' own pipelines, on tiny checkpoints written in native formats.

Run: /work/venv/bin/pytest tests/test_encoders.py -q

Tolerances (stated per test):
- image already at the model's input size: the wrapper sees exactly the library's pixels -> max abs diff < 1e-4;
- image that needs resampling: torch antialiased interpolation vs PIL on uint8 -> cosine similarity > 0.999
  per feature vector (summary; dense averaged over patches) and the measured value is printed.
"""

from __future__ import annotations

import copy
import sys
import types

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything import SamPredictor
from timm.data import create_transform, resolve_data_config
from torchvision.transforms.functional import to_tensor

import tiny_teachers as tiny
from distill.encoders import ENCODERS, OpenClipEncoder, SamEncoder, TimmEncoder, build_encoder, build_sam
from distill.common.names import resolve_model_name, resolve_path

EXACT_ATOL = 1e-4
RESAMPLED_MIN_COSINE = 0.999  # measured ~0.99997; a wrong resize geometry (squash) gives 0.44-0.84


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny checkpoints in each library's native format, written once per module."""
    root = tmp_path_factory.mktemp("teachers")
    return {
        "clip_dir": tiny.write_open_clip_dir(root / "clip"),
        "clip_name": tiny.register_open_clip_config(root / "clip_cfg"),
        "clip_file": tiny.write_open_clip_state_dict(root / "clip.pt", seed=1),
        "timm_dir": tiny.write_timm_dir(root / "dino", reg_tokens=4, crop_pct=1.0, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25)),
        "timm_file": tiny.write_timm_state_dict(root / "vit.pth", seed=2),
        "sam_file": tiny.write_sam_state_dict(root / "sam.pth", seed=3),
    }


def pil_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB image (smooth so resampling differences stay small, as on real photos)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, height // 6), max(2, width // 6), generator=generator)
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    return Image.fromarray((smooth.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over the channel dim (dim 1)."""
    return F.cosine_similarity(a, b, dim=1).mean().item()


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, exact: bool, what: str) -> None:
    assert ours.shape == theirs.shape, what
    if exact:
        diff = (ours - theirs).abs().max().item()
        print(f"{what}: max abs diff {diff:.2e}")
        assert diff < EXACT_ATOL, f"{what}: max abs diff {diff}"
    else:
        sim = cosine(ours, theirs)
        print(f"{what}: cosine {sim:.5f}")
        assert sim > RESAMPLED_MIN_COSINE, f"{what}: cosine {sim}"


# ---------------------------------------------------------------- open_clip


@pytest.mark.parametrize("size, exact", [((32, 32), True), ((48, 40), False), ((29, 61), False)])
@pytest.mark.parametrize("source", ["local_dir", "state_dict_file"])
def test_open_clip_parity(files, source, size, exact):
    if source == "local_dir":
        name, pretrained = "local-dir:" + str(files["clip_dir"]), None
    else:
        name, pretrained = files["clip_name"], str(files["clip_file"])
    model, _, transform = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    model.eval()
    encoder = OpenClipEncoder(name, pretrained=pretrained).freeze()
    image = pil_image(*size)
    with torch.inference_mode():
        pixels = transform(image).unsqueeze(0)
        summary = model.encode_image(pixels)
        model.visual.output_tokens = True  # the library's own path to the final (ln_post) patch tokens
        _, tokens = model.visual(pixels)
        out = encoder(to_tensor(image).unsqueeze(0))
    grid = encoder.input_size[0] // encoder.patch_size
    dense = tokens.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    assert out.summary.shape == (1, encoder.summary_dim) == (1, tiny.TINY_CLIP_CONFIG["embed_dim"])
    assert out.dense.shape == (1, 32, 4, 4)
    assert_close(out.summary, summary, exact, f"open_clip {source} {size} summary")
    assert_close(out.dense, dense, exact, f"open_clip {source} {size} dense")


def test_open_clip_rejects_pretrained_with_folder(files):
    with pytest.raises(ValueError, match="pretrained='x.pt' is ignored for 'local-dir:' names"):
        OpenClipEncoder("local-dir:" + str(files["clip_dir"]), pretrained="x.pt")


def test_open_clip_reads_preprocess_cfg_from_folder(files):
    encoder = OpenClipEncoder("local-dir:" + str(files["clip_dir"]))
    assert list(encoder.preprocess_cfg["mean"]) == tiny.TINY_CLIP_PREPROCESS["mean"]
    images = torch.full((1, 3, 32, 32), 0.5)
    expected = (0.5 - torch.tensor(tiny.TINY_CLIP_PREPROCESS["mean"])) / torch.tensor(tiny.TINY_CLIP_PREPROCESS["std"])
    assert torch.allclose(encoder.preprocess(images)[0, :, 0, 0], expected, atol=1e-6)


def test_open_clip_penultimate_layer(files):
    name = "local-dir:" + str(files["clip_dir"])
    model = open_clip.create_model(name).eval()
    encoder = OpenClipEncoder(name, layer=-2)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        reference = model.visual.forward_intermediates(pixels, indices=None, output_extra_tokens=True)
        out = encoder.encode(pixels)
    assert encoder.dense_dim == 32 and encoder.summary_dim == 32
    assert torch.allclose(out.dense, reference["image_intermediates"][-2], atol=1e-5)
    assert torch.allclose(out.summary, reference["image_intermediates_prefix"][-2][:, 0], atol=1e-5)
    assert not torch.allclose(out.dense, reference["image_intermediates"][-1], atol=1e-3)


# ---------------------------------------------------------------- timm


@pytest.mark.parametrize("size, exact", [((32, 32), True), ((50, 36), False)])
@pytest.mark.parametrize("source", ["local_dir_reg4", "state_dict_file"])
def test_timm_parity(files, source, size, exact):
    if source == "local_dir_reg4":
        kwargs = dict(model_name="local-dir:" + str(files["timm_dir"]))
        model = timm.create_model(kwargs["model_name"], pretrained=True)
        prefix_tokens = 5
    else:
        kwargs = dict(model_name=tiny.TINY_VIT_NAME, checkpoint=str(files["timm_file"]))
        model = timm.create_model(tiny.TINY_VIT_NAME, pretrained=True, pretrained_cfg_overlay=dict(file=kwargs["checkpoint"]))
        prefix_tokens = 1
        exact = False  # crop_pct 0.9 resizes even a 32 px image to 35 px
    model.eval()
    encoder = TimmEncoder(**kwargs).freeze()
    transform = create_transform(**resolve_data_config({}, model=model))
    image = pil_image(*size, seed=4)
    with torch.inference_mode():
        tokens = model.forward_features(transform(image).unsqueeze(0))
        out = encoder(to_tensor(image).unsqueeze(0))
    assert model.num_prefix_tokens == prefix_tokens
    dense = tokens[:, prefix_tokens:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    assert out.summary.shape == (1, 32) and out.dense.shape == (1, 32, 4, 4)
    assert_close(out.summary, tokens[:, 0], exact, f"timm {source} {size} summary")
    assert_close(out.dense, dense, exact, f"timm {source} {size} dense")


def test_timm_reads_data_config_from_folder(files):
    encoder = TimmEncoder("local-dir:" + str(files["timm_dir"]))
    assert encoder.data_config["crop_pct"] == 1.0
    pixels = encoder.preprocess(torch.full((1, 3, 32, 32), 0.5))
    expected = (0.5 - torch.tensor([0.4, 0.5, 0.6])) / torch.tensor([0.2, 0.3, 0.25])
    assert torch.allclose(pixels[0, :, 3, 3], expected, atol=1e-6)


@pytest.mark.parametrize("image_size, grid", [(None, 4), (48, 6)])
def test_timm_image_size_sets_grid(files, image_size, grid):
    encoder = TimmEncoder(tiny.TINY_VIT_NAME, checkpoint=str(files["timm_file"]), image_size=image_size)
    out = encoder(torch.rand(2, 3, 40, 57))
    assert encoder.input_size == (grid * 8, grid * 8)
    assert out.dense.shape == (2, 32, grid, grid) and out.summary.shape == (2, 32)


def test_timm_penultimate_layer(files):
    name = "local-dir:" + str(files["timm_dir"])
    model = timm.create_model(name, pretrained=True).eval()
    encoder = TimmEncoder(name, layer=-2)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        reference = model.forward_intermediates(pixels, indices=None, return_prefix_tokens=True, intermediates_only=True)
        out = encoder.encode(pixels)
    dense, prefix = reference[-2]
    assert torch.allclose(out.dense, dense, atol=1e-5)
    assert torch.allclose(out.summary, prefix[:, 0], atol=1e-5)
    assert not torch.allclose(out.dense, reference[-1][0], atol=1e-3)


# ---------------------------------------------------------------- SAM


@pytest.mark.parametrize(
    "size, exact, grid",
    [((64, 64), True, (8, 8)), ((40, 64), True, (5, 8)), ((64, 27), True, (8, 4)), ((30, 50), False, (5, 8)), ((100, 90), False, (8, 8))],
)
def test_sam_parity(files, size, exact, grid):
    sam = build_sam("tiny", str(files["sam_file"]))
    predictor = SamPredictor(sam)
    image = pil_image(*size, seed=5)
    encoder = SamEncoder("tiny", checkpoint=str(files["sam_file"])).freeze()
    with torch.inference_mode():
        predictor.set_image(np.array(image))
        out = encoder(to_tensor(image).unsqueeze(0))
    rows, cols = grid
    reference = predictor.get_image_embedding()[:, :, :rows, :cols]
    assert out.summary is None and encoder.summary_dim is None
    assert out.dense.shape == (1, 64, rows, cols)
    assert_close(out.dense, reference, exact, f"sam {size} dense")


def test_sam_penultimate_layer(files):
    encoder = SamEncoder("tiny", checkpoint=str(files["sam_file"]), layer=-2)
    truncated = copy.deepcopy(encoder.image_encoder)  # the library's forward with the last block and neck removed
    truncated.blocks = truncated.blocks[:-1]
    truncated.neck = torch.nn.Identity()
    images = torch.rand(2, 3, 64, 48)
    with torch.inference_mode():
        out = encoder(images)
        reference = truncated(encoder.preprocess(images))[:, :, :8, :6]  # ImageEncoderViT hands the neck NCHW
    assert encoder.dense_dim == 96 and out.dense.shape == (2, 96, 8, 6)
    assert torch.allclose(out.dense, reference, atol=1e-5)


def test_build_sam_round_trip(files):
    sam = build_sam("tiny", str(files["sam_file"]))
    saved = torch.load(files["sam_file"], weights_only=True)
    assert not sam.training
    assert all(torch.equal(saved[k], v) for k, v in sam.state_dict().items())
    assert sam.image_encoder.img_size == 64 and sam.prompt_encoder.embed_dim == 64


# ---------------------------------------------------------------- common behaviour


def make_encoders(files):
    return [
        OpenClipEncoder("local-dir:" + str(files["clip_dir"])),
        TimmEncoder("local-dir:" + str(files["timm_dir"])),
        SamEncoder("tiny", checkpoint=str(files["sam_file"])),
    ]


def test_freeze_pins_eval_and_stops_gradients(files):
    for encoder in make_encoders(files):
        parent = torch.nn.Sequential(encoder)
        encoder.freeze()
        parent.train()
        assert not encoder.training
        assert all(not module.training for module in encoder.modules())
        assert all(not p.requires_grad for p in encoder.parameters())
        out = encoder(torch.rand(1, 3, 32, 32))
        assert not out.dense.requires_grad


def test_unfrozen_encoder_follows_train(files):
    encoder = TimmEncoder("local-dir:" + str(files["timm_dir"]))
    encoder.train()
    assert encoder.training and encoder.model.training
    assert any(p.requires_grad for p in encoder.parameters())


def test_registry_builds_each_kind(files):
    assert set(ENCODERS) == {"open_clip", "timm", "sam"}
    encoder = build_encoder("sam", variant="tiny", checkpoint=str(files["sam_file"]))
    assert isinstance(encoder, SamEncoder) and encoder.dense_dim == 64
    with pytest.raises(ValueError, match="Unknown encoder kind 'dino'"):
        build_encoder("dino")


def test_dims_match_outputs(files):
    for encoder in make_encoders(files):
        out = encoder(torch.rand(3, 3, *encoder.input_size))
        grid = encoder.input_size[0] // encoder.patch_size
        assert out.dense.shape == (3, encoder.dense_dim, grid, grid), type(encoder).__name__
        assert (out.summary is None) == (encoder.summary_dim is None)


# ---------------------------------------------------------------- toy: paths


@pytest.fixture
def fake_toy_cache(monkeypatch, files):
    """Stand-in for distill.toy.cache (owned by another helper) mapping toy names to our tiny files."""
    paths = {"clip": files["clip_dir"], "dino": files["timm_dir"], "sam": files["sam_file"]}
    module = types.ModuleType("distill.toy.cache")
    module.toy_path = lambda name: paths[name]
    monkeypatch.setitem(sys.modules, "distill.toy.cache", module)
    return paths


def test_resolve_toy_paths(fake_toy_cache):
    assert resolve_path("toy:sam") == str(fake_toy_cache["sam"])
    assert resolve_model_name("toy:clip") == "local-dir:" + str(fake_toy_cache["clip"])
    assert resolve_path("/some/file.pth") == "/some/file.pth" and resolve_path(None) is None
    assert resolve_model_name("ViT-B-16") == "ViT-B-16"


def test_encoders_load_toy_strings(fake_toy_cache):
    assert OpenClipEncoder("toy:clip").input_size == (32, 32)
    assert TimmEncoder("toy:dino").model.num_prefix_tokens == 5
    sam = SamEncoder("tiny", checkpoint="toy:sam")
    saved = torch.load(fake_toy_cache["sam"], weights_only=True)
    assert torch.equal(sam.image_encoder.patch_embed.proj.weight, saved["image_encoder.patch_embed.proj.weight"])
