"""Fusion modules (mllm/fusion.py): hand-checked shapes, token counts and parameter counts, gradients to every
fusion parameter, frozen encoders unchanged by a training step, the CLI training a fusion, and the live tower
and the cached-feature tower handing the projector the same tokens (tests/test_fusion.py)."""

import pytest
import torch
import yaml

from distill.encoders import OpenClipEncoder, TimmEncoder
from llava_configs import cli_trainer
from mllm.cli import make_cli
from mllm.data import LlavaJsonSource, SampleEncoder, collate
from mllm.features import load_features, tower_features, write_features
from mllm.fusion import (ChannelFusion, ExpertMLPFusion, MultiLayerFusion, ResamplerFusion, SequenceFusion,
                         build_fusion)
from mllm.loading import load_tokenizer
from mllm.module import LlavaModule
from mllm.towers import EnsembleTower, SingleEncoderTower, encoder_maps
from tiny_llava import tiny_llava_records, write_llava_json, write_tiny_lm
from tiny_teachers import write_open_clip_dir, write_timm_dir

DIMS = [4, 6]


def features(batch=2, tokens=4, layers=(1, 1), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, l, tokens, d, generator=generator) for l, d in zip(layers, DIMS)]


def bound(fusion, dims=DIMS, grid=2):
    fusion.bind(dims, grid)
    return fusion


def test_parameter_free_fusions_concatenate_by_hand():
    x = features()
    channel = bound(ChannelFusion())(x)
    assert channel.shape == (2, 4, 10) and torch.equal(channel, torch.cat([x[0][:, 0], x[1][:, 0]], -1))
    sequence = bound(SequenceFusion())(x)
    assert sequence.shape == (2, 8, 10)  # 4 + 4 tokens, each encoder in its own channel block
    assert torch.equal(sequence[:, :4, :4], x[0][:, 0]) and not sequence[:, :4, 4:].any()
    assert torch.equal(sequence[:, 4:, 4:], x[1][:, 0]) and not sequence[:, 4:, :4].any()
    assert build_fusion("channel").__class__ is ChannelFusion
    with pytest.raises(ValueError, match="fusion 'concat' is unknown"):
        build_fusion("concat")


def test_expert_mlp_is_one_mlp_per_encoder_with_tokens_in_sequence():
    fusion = bound(ExpertMLPFusion(width=5))
    # per expert: Linear(C, 5) + Linear(5, 5): (4*5+5 + 5*5+5) + (6*5+5 + 5*5+5) = 55 + 65
    assert sum(p.numel() for p in fusion.parameters()) == 120
    x = features()
    out = fusion(x)
    assert out.shape == (2, 8, 5) and fusion.dim == 5
    assert torch.allclose(out[:, 4:], fusion.experts[1](x[1][:, 0]))  # the second expert's tokens come second


def test_resampler_gives_k_tokens_whatever_the_number_of_encoders():
    two = bound(ResamplerFusion(width=8, heads=2))  # K = grid * grid = 4
    assert two(features(tokens=9)).shape == (2, 4, 8) and two.queries.shape == (4, 8)
    three = bound(ResamplerFusion(num_queries=3, width=8, heads=2), dims=[4, 6, 5])
    x = features(tokens=9) + [torch.randn(2, 1, 16, 5)]  # encoders with 9, 9 and 16 tokens
    assert three(x).shape == (2, 3, 8)
    assert three.input_sizes(2, [(3, 3), (4, 4)]) == [(3, 3), (4, 4)]  # own grids by default, as BRAVE
    assert ResamplerFusion(input_grid=2).input_sizes(None, [(3, 3), (4, 4)]) == [(2, 2), (2, 2)]
    with pytest.raises(ValueError, match="not divisible by heads=3"):
        bound(ResamplerFusion(width=8, heads=3))


def test_multilayer_merges_lln_layers_with_uniform_weights_at_start():
    fusion = bound(MultiLayerFusion(layers=[[0, 1], [-1]], width=3, mlp=[False, True]))
    x = features(layers=(2, 1))
    out = fusion(x)
    assert out.shape == (2, 4, 6) and fusion.dim == 6
    by_hand = 0.5 * fusion.lln[0][0](x[0][:, 0]) + 0.5 * fusion.lln[0][1](x[0][:, 1])  # softmax(0, 0) = 1/2 each
    assert torch.allclose(out[..., :3], by_hand, atol=1e-6)
    assert torch.allclose(out[..., 3:], fusion.branch_mlp[1](fusion.lln[1][0](x[1][:, 0])), atol=1e-6)  # DINO: MLP
    with pytest.raises(ValueError, match="2 encoders but `layers` has 1"):
        bound(MultiLayerFusion(layers=[[0]]))


@pytest.mark.parametrize("fusion", [ExpertMLPFusion(width=5), ResamplerFusion(width=8, heads=2),
                                    MultiLayerFusion(layers=[[0, 1], [0]], mlp=[False, True])],
                         ids=["expert_mlp", "resampler", "multilayer"])
def test_every_fusion_parameter_receives_a_gradient(fusion):
    bound(fusion)
    out = fusion(features(layers=(len(fusion.layers[0]), 1) if fusion.layers else (1, 1)))
    (out * torch.randn_like(out)).sum().backward()  # random weights: a plain sum is flat through a LayerNorm
    missing = [n for n, p in fusion.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fusion")
    data = write_llava_json(tiny_llava_records(tmp / "img", 8, "align"), tmp / "align.json")
    return {"tmp": tmp, "lm": str(write_tiny_lm(tmp / "lm", steps=5)), "vit": str(write_timm_dir(tmp / "vit")),
            "clip": str(write_open_clip_dir(tmp / "clip")), "data": str(data)}


def encoders(setup):
    return [TimmEncoder(f"local-dir:{setup['vit']}", pretrained=True, layer=-2),
            OpenClipEncoder(f"local-dir:{setup['clip']}", layer=-2)]


IMAGES = torch.rand(3, 3, 32, 32)


def test_multilayer_tower_reads_each_chosen_layer(setup):
    vit, clip = encoders(setup)
    tower = EnsembleTower([vit, clip], MultiLayerFusion(layers=[[-1, -2], [-2]]), grid=2)
    vit_layers, clip_layers = tower.features(IMAGES)
    assert vit_layers.shape == (3, 2, 4, vit.dense_dim) and clip_layers.shape == (3, 1, 4, clip.dense_dim)
    assert vit.layer == -2  # the encoder's own layer is restored
    assert torch.allclose(vit_layers[:, 1], SingleEncoderTower(vit, grid=2).features(IMAGES)[0][:, 0], atol=1e-6)
    assert tower(IMAGES).shape == (3, 4, vit.dense_dim + clip.dense_dim)


def _patch_embed(encoder):
    return encoder.model.patch_embed if isinstance(encoder, TimmEncoder) else encoder.visual.conv1


@torch.inference_mode()
def test_dense_layers_read_every_layer_from_one_forward_with_the_per_layer_values(setup):
    for encoder in encoders(setup):
        encoder.eval()
        layers = [-1, 0, -2, 0]  # the final (normed) output, a repeat, out of block order
        expected = []
        for layer in layers:
            encoder.layer = layer
            expected.append(encoder(IMAGES).dense)
        encoder.layer = -2
        calls = []
        hook = _patch_embed(encoder).register_forward_hook(lambda *args: calls.append(1))
        try:
            got = encoder_maps(encoder, IMAGES, layers)
        finally:
            hook.remove()
        assert len(calls) == 1, type(encoder).__name__  # one forward, not one per layer
        assert encoder.layer == -2
        for layer, g, e in zip(layers, got, expected):
            assert g.shape == e.shape and torch.allclose(g, e, atol=1e-6, rtol=0), (type(encoder).__name__, layer)
        assert not torch.allclose(got[0], got[2])  # the final norm is applied to -1 only
        with pytest.raises(ValueError, match="layer=7 is outside"):
            encoder.dense_layers(IMAGES, [0, 7])


def test_a_training_step_moves_the_fusion_and_leaves_frozen_encoders_alone(setup):
    torch.manual_seed(0)
    tower = EnsembleTower(encoders(setup), ResamplerFusion(width=16, heads=2), grid=2, norm="layernorm")
    module = LlavaModule(tower, lm=setup["lm"], stage="align", projector_lr=1e-2, fusion_lr=5e-3)
    module.train()
    groups = module.parameter_groups()
    assert [(g["name"], g["lr"]) for g in groups] == [("projector", 1e-2), ("fusion", 5e-3)]
    assert {n for n in module.trained_parameter_names() if ".tower." in n} == {
        f"model.tower.fusion.{n}" for n, _ in tower.fusion.named_parameters()}
    assert all(not e.training and not any(p.requires_grad for p in e.parameters()) for e in tower.encoders)
    encoders_before = {k: v.clone() for k, v in tower.encoders.state_dict().items()}
    fusion_before = {k: v.clone() for k, v in tower.fusion.state_dict().items()}
    encode = SampleEncoder(load_tokenizer(setup["lm"]), tower.num_tokens, 64, 32)
    dataset = LlavaJsonSource(setup["data"], str(setup["tmp"] / "img")).dataset(encode)
    batch = collate([dataset[i] for i in range(4)], pad_token_id=0)
    optimizer = torch.optim.AdamW(groups)
    module(batch).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.fusion.parameters())
    optimizer.step()
    assert all(torch.equal(v, tower.encoders.state_dict()[k]) for k, v in encoders_before.items())
    assert all(not torch.equal(v, tower.fusion.state_dict()[k]) for k, v in fusion_before.items())


def test_cli_fit_trains_the_fusion_of_a_live_tower(setup):
    tmp = setup["tmp"]
    tower = {"class_path": "mllm.towers.EnsembleTower", "init_args": {
        "grid": 2, "norm": "whiten",
        "fusion": {"class_path": "mllm.fusion.ExpertMLPFusion", "init_args": {"width": 8}},
        "encoders": [{"class_path": "distill.encoders.TimmEncoder",
                      "init_args": {"model_name": f"local-dir:{setup['vit']}", "pretrained": True, "layer": -2}},
                     {"class_path": "distill.encoders.OpenClipEncoder",
                      "init_args": {"model_name": f"local-dir:{setup['clip']}", "layer": -2}}]}}
    config = {"trainer": cli_trainer(tmp / "run", 2, "align"),
              "model": {"tower": tower, "lm": setup["lm"], "stage": "align", "fusion_lr": 1e-3},
              "data": {"train": {"class_path": "mllm.data.LlavaJsonSource",
                                 "init_args": {"json_path": setup["data"], "image_folder": str(tmp / "img")}},
                       "batch_size": 4, "image_size": 32, "max_length": 64}}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = make_cli(["fit", "-c", str(path)])
    saved = torch.load(tmp / "run" / "align.ckpt", weights_only=True)["state_dict"]
    fusion = {k for k in saved if k.startswith("model.tower.fusion.")}
    assert fusion == {f"model.tower.fusion.{n}" for n, _ in cli.model.model.tower.fusion.named_parameters()}
    assert all(k.startswith(("model.projector.", "model.tower.fusion.", "model.tower.token_stats."))
               for k in saved)  # encoders not saved
    # the whiten statistics, measured at fit start on the training images, travel in the checkpoint
    stats = {k: v for k, v in saved.items() if k.startswith("model.tower.token_stats.")}
    assert set(stats) == {f"model.tower.token_stats.{p}.0.{b}" for p in (0, 1) for b in ("mean", "std", "matrix",
                                                                                          "calibrated")}
    assert all(bool(v) for k, v in stats.items() if k.endswith("calibrated"))
    assert torch.equal(stats["model.tower.token_stats.0.0.mean"], cli.model.model.tower.token_stats[0][0].mean)
    # ... and the next stage (init_from) starts with them, so it measures nothing again
    fresh = EnsembleTower(encoders(setup), ExpertMLPFusion(width=8), grid=2, norm="whiten")
    assert fresh.needs_calibration
    LlavaModule(fresh, lm=setup["lm"], stage="finetune", init_from=str(tmp / "run" / "align.ckpt"))
    assert not fresh.needs_calibration
    assert torch.equal(fresh.token_stats[1][0].matrix, cli.model.model.tower.token_stats[1][0].matrix)


@pytest.mark.parametrize("fusion", ["channel", {"class_path": "mllm.fusion.ResamplerFusion",
                                                "init_args": {"width": 16, "heads": 2}}], ids=["channel", "resampler"])
def test_live_and_cached_towers_hand_the_projector_the_same_tokens(setup, tmp_path, fusion):
    from mllm.study.common import build_tower

    encoder_configs = [{"class_path": "distill.encoders.TimmEncoder",
                        "init_args": {"model_name": f"local-dir:{setup['vit']}", "pretrained": True, "layer": -2}},
                       {"class_path": "distill.encoders.OpenClipEncoder",
                        "init_args": {"model_name": f"local-dir:{setup['clip']}", "layer": -2}}]
    torch.manual_seed(0)
    live = build_tower({"class_path": "mllm.towers.EnsembleTower", "init_args": {
        "encoders": encoder_configs, "fusion": fusion, "grid": 2, "norm": "layernorm"}})
    path = write_features(tower_features(live, IMAGES), tmp_path / "f.safetensors", {"seed": 0, "image_size": 32})
    cached = build_tower({"class_path": "mllm.features.CachedTower", "init_args": {
        "features": str(path), "fusion": fusion, "grid": 2, "norm": "layernorm"}})
    cached.fusion.load_state_dict(live.fusion.state_dict())  # the same trained fusion weights
    cached_tokens = cached(load_features(path, seed=0, image_size=32, num_images=3))
    live_tokens = live(IMAGES)
    assert cached_tokens.shape == live_tokens.shape == (3, 4, live.dim) and cached.num_tokens == live.num_tokens
    assert torch.allclose(cached_tokens, live_tokens, atol=1e-5)
    assert live_tokens.abs().max() > 0.1  # not trivially zero


@pytest.mark.parametrize("norm", ["whiten", "standardize"])
def test_live_and_cached_towers_calibrated_by_the_module_hand_the_projector_the_same_tokens(setup, tmp_path, norm):
    from mllm.datamodule import LlavaDataModule
    from mllm.data import ToySource
    from mllm.features import toy_images
    from mllm.study.common import build_tower

    fusion = {"class_path": "mllm.fusion.MultiLayerFusion", "init_args": {"layers": [[-1, -2], [-2]]}}
    encoder_configs = [{"class_path": "distill.encoders.TimmEncoder",
                        "init_args": {"model_name": f"local-dir:{setup['vit']}", "pretrained": True, "layer": -2}},
                       {"class_path": "distill.encoders.OpenClipEncoder",
                        "init_args": {"model_name": f"local-dir:{setup['clip']}", "layer": -2}}]
    live = build_tower({"class_path": "mllm.towers.EnsembleTower", "init_args": {
        "encoders": encoder_configs, "fusion": fusion, "grid": 2, "norm": norm}})
    images = toy_images(seed=0, num_images=12, image_size=32)
    path = write_features(tower_features(live, images), tmp_path / "f.safetensors",
                          {"seed": 0, "image_size": 32, "max_objects": 4})
    cached = build_tower({"class_path": "mllm.features.CachedTower", "init_args": {
        "features": str(path), "fusion": fusion, "grid": 2, "norm": norm}})
    assert len(live.token_stats) == 2 and [len(p) for p in live.token_stats] == [2, 1]  # per encoder and layer
    with pytest.raises(RuntimeError, match=f"EnsembleTower\\(norm='{norm}'\\) part 0 layer 0.*never measured"):
        live(images[:2])
    towers = {}
    for name, tower, features in (("live", live, None), ("cached", cached, str(path))):
        module = LlavaModule(tower, lm=setup["lm"], stage="align", norm_calibration_images=10)
        data = LlavaDataModule(train=ToySource(seed=0, num_images=12, image_size=32, features=features),
                               tokenizer=setup["lm"], image_size=32, batch_size=4, num_image_tokens=tower.num_tokens)
        assert tower.needs_calibration
        module.calibrate_tower(data)
        assert not tower.needs_calibration
        towers[name] = tower
    # the calibration set is the first 10 records' images (0..9), not all 12, whatever the order of batches
    first = live.features(images[:10])[1][:, 0].reshape(-1, live.dims[1]).double()
    assert torch.allclose(live.token_stats[1][0].mean.double(), first.mean(0), atol=1e-5)
    for live_stats, cached_stats in zip(live.token_stats.state_dict().values(), cached.token_stats.state_dict().values()):
        assert torch.allclose(live_stats.float(), cached_stats.float(), atol=1e-4)
    cached.fusion.load_state_dict(live.fusion.state_dict())
    rows = load_features(path, seed=0, image_size=32, num_images=12)
    live_tokens, cached_tokens = live(images), cached(rows)
    assert live_tokens.shape == (12, 4, live.dim)
    assert torch.allclose(cached_tokens, live_tokens, atol=1e-4)
    assert live_tokens.abs().max() > 0.1


def test_cost_counts_the_fusion_by_hand_and_leaves_it_trainable(setup):
    from mllm.study.cost import tower_cost

    vit, clip = encoders(setup)
    tower = EnsembleTower([vit, clip], ExpertMLPFusion(width=8), grid=2)
    cost = tower_cost(tower, image_size=32, batch_size=2, repeats=1)
    widths = [vit.dense_dim, clip.dense_dim]
    assert cost["fusion_params_m"] * 1e6 == pytest.approx(sum(c * 8 + 8 + 8 * 8 + 8 for c in widths))
    # per image: each expert's two matmuls on its 4 tokens, 2 FLOPs per multiply-add
    assert cost["fusion_gflops_per_image"] * 1e9 == pytest.approx(sum(2 * 4 * (c * 8 + 8 * 8) for c in widths))
    assert cost["gflops_per_image"] > cost["fusion_gflops_per_image"]
    assert all(p.requires_grad for p in tower.fusion.parameters())


def test_study_features_share_each_encoders_maps_and_equal_the_towers_own(setup, tmp_path, monkeypatch):
    """The study computes an encoder's dense maps once per (encoder config, layer): an ensemble after a single
    tower of the same encoder reuses its maps, and both equal the towers' own `tower_features`."""
    import mllm.features as features_module
    from mllm.study.common import build_tower
    from mllm.study.config import Budget, Study
    from mllm.study.instrument import Features

    vit = {"class_path": "distill.encoders.TimmEncoder",
           "init_args": {"model_name": f"local-dir:{setup['vit']}", "pretrained": True, "layer": -2}}
    clip = {"class_path": "distill.encoders.OpenClipEncoder", "init_args": {"model_name": f"local-dir:{setup['clip']}", "layer": -2}}
    single = {"class_path": "mllm.towers.SingleEncoderTower", "init_args": {"encoder": vit, "grid": 2}}
    comm = {"class_path": "mllm.towers.EnsembleTower", "init_args": {
        "encoders": [vit, clip], "grid": 2,
        "fusion": {"class_path": "mllm.fusion.MultiLayerFusion", "init_args": {"layers": [[-1, -2], [-2]]}}}}
    study = Study(align_recipe="a.yaml", finetune_recipe="f.yaml", distill_recipe="d.yaml", variants=[], image_size=32)
    features = Features(study, Budget(), tmp_path, {})
    features._images[0] = IMAGES
    calls = []
    real = features_module.encoder_dense_maps
    monkeypatch.setattr(features_module, "encoder_dense_maps", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    for config in (single, comm):
        tower = build_tower(config)
        shared = features.tower_features(config, tower, 0, "test")
        own = features_module.tower_features(tower, IMAGES)
        assert [f.shape for f in shared] == [f.shape for f in own]
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(shared, own))
    # the single tower's vit maps (its own layer, -2) serve the ensemble's vit layer -2: vit -2, vit -1, clip -2;
    # then a second ensemble of the same encoders computes nothing new
    assert calls == [-2, -1, -2]
    features.tower_features(comm, build_tower(comm), 0, "test")
    assert len(calls) == 3
