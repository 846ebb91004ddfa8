"""distill/model.py StudentModel: token layout, layers, adaptors and their normalizer, and the export round trip
(timm save_for_hf backbone + one adaptors file) into the same class and into StudentEncoder."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from distill.exported import StudentEncoder
from distill.model import StudentModel

ARGS = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)


def make_model(normalizer=None) -> StudentModel:
    torch.manual_seed(0)
    model = StudentModel("vit_small_patch16_224", ["clip", "dino"], num_registers=2, img_size=32, mean=MEAN, std=STD,
                         model_args=ARGS)
    model.add_adaptor("clip", 24, 20, hidden_dim=16, normalizer=normalizer)
    model.add_adaptor("sam", None, 12, hidden_dim=16, normalizer=normalizer)
    if normalizer:
        for head in model.heads.values():  # a fitted map: mean 1..C, std 2
            dim = head.norm.dim
            head.norm.mean.copy_(torch.arange(1.0, dim + 1))
            head.norm.std.fill_(2.0)
            head.norm.count.fill_(10)
    return model.eval()


def test_forward_token_layout_and_layers():
    model = make_model()
    images = torch.rand(2, 3, 40, 24)  # not the img_size: dynamic size
    with torch.no_grad():
        out = model(images)
        pixels = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        tokens = model.model.forward_features(pixels)
    assert model.model.num_prefix_tokens == 4  # clip, dino summary tokens + 2 registers
    torch.testing.assert_close(out.tokens, tokens)
    assert torch.equal(out.summary["clip"], tokens[:, 0]) and torch.equal(out.summary["dino"], tokens[:, 1])
    assert out.dense.shape == (2, 48, 5, 3)
    assert torch.equal(out.dense[:, :, 1, 2], tokens[:, 4 + 1 * 3 + 2])  # row-major patch grid after the prefix
    assert set(out.adaptors) == {"clip", "sam"}
    assert out.adaptors["clip"].summary.shape == (2, 24) and out.adaptors["clip"].dense.shape == (2, 20, 5, 3)
    assert out.adaptors["sam"].summary is None
    with torch.no_grad():
        penultimate = model(images, layer=-2, adaptors=[])
        blocks = model.model.blocks[0](model.model._pos_embed(model.model.patch_embed(pixels)))
    assert penultimate.adaptors == {}
    torch.testing.assert_close(penultimate.tokens, blocks)  # block -2 of 2 = the first block's output, no final norm
    with pytest.raises(ValueError, match="not divisible by patch size 8"):
        model(torch.rand(1, 3, 30, 32))
    with pytest.raises(KeyError, match="no adaptor for teacher 'dino'"):
        model(images, adaptors=["dino"])
    with pytest.raises(ValueError, match="not in summary_names"):
        model.add_adaptor("siglip", 8, 8)


def test_an_earlier_layer_runs_only_the_blocks_it_needs():
    """layer=-2 of a 2-block student stops after block 0: block 1 never runs (a tower reading layer -2 costs what
    it reads), and the tokens equal timm's own intermediates computed through the whole model."""
    from mllm.study.cost import count_flops

    model = make_model()
    images = torch.rand(2, 3, 32, 32)
    ran = []
    hook = model.model.blocks[1].register_forward_hook(lambda *_: ran.append(1))
    with torch.no_grad():
        tokens = model.tokens(images, layer=-2)
    hook.remove()
    assert ran == []
    pixels = model.conditioner(images)
    with torch.no_grad():
        patches, prefix = model.model.forward_intermediates(pixels, indices=[-2], norm=False, output_fmt="NLC",
                                                            intermediates_only=True, return_prefix_tokens=True)[0]
    torch.testing.assert_close(tokens, torch.cat([prefix, patches], dim=1))
    full, _ = count_flops(lambda x: model.tokens(x, layer=-1), images)
    early, _ = count_flops(lambda x: model.tokens(x, layer=-2), images)
    # one block fewer: qkv + proj + fc1 + fc2 = 2 * 20 tokens * (3 + 1 + 4 + 4) * 48^2, plus QK^T and AV: 2 * 2 * 20^2 * 48
    assert full - early == 2 * 2 * 20 * 12 * 48 * 48 + 2 * 2 * 2 * 20 * 20 * 48


def test_teacher_space_inverts_the_normalizer():
    model = make_model("channel_standardizer")
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        normalized = model(images).adaptors["clip"].dense
        raw = model(images, teacher_space=True).adaptors["clip"].dense
    expected = normalized * 2.0 + torch.arange(1.0, 21).view(1, -1, 1, 1)  # std 2, mean 1..20 by hand
    torch.testing.assert_close(raw, expected)


@pytest.mark.parametrize("normalizer", [None, "channel_standardizer"])
def test_export_round_trip(tmp_path, normalizer):
    model = make_model(normalizer)
    out = model.export(tmp_path / "export", extra={"dense_loss": "mse" if normalizer else "cosine_smooth_l1"})
    assert sorted(p.name for p in out.iterdir()) == ["adaptors.json", "adaptors.safetensors", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch16_224" and "num_classes" not in config["model_args"]
    assert config["model_args"]["reg_tokens"] == 3 and config["pretrained_cfg"]["mean"] == list(MEAN)
    layout = json.loads((out / "adaptors.json").read_text())
    assert layout["summary_names"] == ["clip", "dino"] and layout["num_prefix_tokens"] == 4 and layout["patch_size"] == 8
    assert set(load_file(str(out / "adaptors.safetensors"))) == set(model.heads.state_dict())
    assert load_file(str(out / "model.safetensors")).keys() == model.model.state_dict().keys()

    loaded = StudentModel.from_export(out).eval()
    config, loaded_config = model.config(), loaded.config()
    assert loaded_config.pop("model_args").items() >= config.pop("model_args").items()  # + in_chans, global_pool
    assert loaded_config == config and loaded.adaptors_config() == model.adaptors_config()
    images = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        a, b = model(images, teacher_space=True), loaded(images, teacher_space=True)
        plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval().forward_features(model.conditioner(images))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(plain, a.tokens)
    for name in ("clip", "sam"):
        assert torch.equal(a.adaptors[name].dense, b.adaptors[name].dense)

    encoder = StudentEncoder(str(out), adaptors=["clip", "sam"]).eval()
    assert encoder.dense_dim == 32 and encoder.summary_dim == 24
    with torch.no_grad():
        got = encoder(images[..., :32])
        ref = model(images[..., :32], teacher_space=True)
    assert torch.equal(got.dense, torch.cat([ref.adaptors["clip"].dense, ref.adaptors["sam"].dense], dim=1))
    assert torch.equal(got.summary, ref.adaptors["clip"].summary)
    with pytest.raises(KeyError, match="No adaptor for teacher 'dino'"):
        StudentModel.from_export(out, adaptors=["dino"])


def test_encoder_preprocess_resizes_short_side_then_crops(tmp_path):
    """StudentEncoder: non-square input -> short side to img_size (truncated like torchvision), centre crop;
    backbone summary = the first prefix token."""
    out = make_model().export(tmp_path / "export", with_adaptors=False)
    encoder = StudentEncoder(str(out)).eval()
    images = torch.rand(1, 3, 50, 37)
    pixels = encoder.preprocess(images)
    assert pixels.shape == (1, 3, 32, 32)
    resized = torch.nn.functional.interpolate(images, size=(43, 32), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(pixels, resized.clamp(0, 1)[..., 6:38, :])  # round((43-32)/2)=6 (5.5 -> 6)
    with torch.no_grad():
        out = encoder(images)
        ref = encoder.student(pixels)
    assert torch.equal(out.summary, ref.tokens[:, 0]) and torch.equal(out.dense, ref.dense)


def test_legacy_export_layout_loads(tmp_path):
    """Exports written before the heads owned their normalizer: 'dense_norm.<t>.*' keys, top-level dense_norm."""
    from safetensors.torch import save_file

    model = make_model("channel_standardizer")
    out = model.export(tmp_path / "export")
    weights = load_file(str(out / "adaptors.safetensors"))
    legacy = {(f"dense_norm.{k.replace('.norm.', '.', 1)}" if ".norm." in k else k): v for k, v in weights.items()}
    save_file(legacy, str(out / "adaptors.safetensors"))
    heads = {name: {k: v for k, v in cfg.items() if k != "normalizer"} for name, cfg in model.adaptors_config().items()}
    (out / "adaptors.json").write_text(json.dumps({"dense_loss": "mse", "dense_norm": "channel_standardizer", "heads": heads}))
    loaded = StudentModel.from_export(out)
    assert torch.equal(loaded.heads["clip"].norm.mean, model.heads["clip"].norm.mean)
