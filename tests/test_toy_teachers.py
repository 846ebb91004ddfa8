"""Tests of the toy teachers: each objective lowers its loss, each checkpoint round-trips through its
library's own loader and through the unitower teacher wrappers, and the cache rebuilds when stale.

    /work/venv/bin/pytest tests/test_toy_teachers.py -q
"""

import copy
import importlib.util
import json

import numpy as np
import open_clip
import pytest
import timm
import torch

from distill.encoders import OpenClipEncoder, SamEncoder, TimmEncoder
from distill.encoders.sam import build_sam
from distill.toy import cache as toy_cache
from distill.toy.cache import ToySettings, cache_status, ensure_cache, toy_path
from distill.toy.train_clip import build_clip, clip_loss, normalize_clip, save_clip, tokenize
from distill.toy.train_dino import DinoHead, DinoModel, build_dino_vit, dino_loss, dino_step_loss, multi_crop, save_dino
from distill.toy.train_sam import decode_batched, point_prompts, predict_masks, sam_batch_loss, sam_pixels, save_sam
from distill.toy.training import optimizer_step, toy_schedule
from distill.toy.world import sample_pool

FAST = ToySettings(clip_steps=1, dino_steps=1, sam_steps=1, num_samples=8, lm_texts=8, lm_steps=1, include_lm=False)


@pytest.fixture(scope="module")
def pool():
    images, samples = sample_pool(0, 8)
    return torch.from_numpy(images), samples


def _images01(pool_images: torch.Tensor) -> torch.Tensor:
    return pool_images.permute(0, 3, 1, 2).float() / 255.0


def test_clip_contrastive_loss_decreases(pool):
    images, samples = pool
    torch.manual_seed(0)
    model = build_clip().train()
    pixels, tokens = normalize_clip(images), tokenize([s.caption for s in samples])
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        losses.append(optimizer_step(clip_loss(model, pixels, tokens, loss_fn), optimizer))
    assert losses[-1] < losses[0] - 0.1, losses


def test_dino_loss_matches_hand_computation_and_decreases(pool):
    # Hand check: teacher view 0 is one-hot-ish, student view 1 uniform -> loss = log(K) for the only pair (0, 1) and (1, 0).
    uniform = torch.zeros(1, 4)
    assert dino_loss([uniform, uniform], [uniform, uniform], torch.zeros(4)).item() == pytest.approx(np.log(4))

    images, _ = pool
    torch.manual_seed(0)
    backbone = build_dino_vit()
    student = DinoModel(backbone, DinoHead(backbone.num_features)).train()
    teacher = copy.deepcopy(student).requires_grad_(False)
    views = multi_crop(_images01(images), 2, torch.Generator().manual_seed(0))
    assert [tuple(v.shape[-2:]) for v in views] == [(64, 64)] * 2 + [(32, 32)] * 2
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    center = torch.zeros(student.head.prototypes.shape[0])
    losses = []
    for _ in range(6):
        losses.append(optimizer_step(dino_step_loss(student, teacher, views, center, teacher_temp=0.04)[0], optimizer))
    assert losses[-1] < losses[0], losses


def test_sam_prompted_mask_loss_decreases(pool):
    images, samples = pool
    torch.manual_seed(0)
    sam = build_sam("tiny").train()
    optimizer = torch.optim.AdamW(sam.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = sam_batch_loss(sam, images[:4], samples[:4], torch.Generator().manual_seed(0))  # same prompts each step
        losses.append(optimizer_step(loss, optimizer))
    assert losses[-1] < losses[0] - 0.05, losses


def test_batched_mask_decoding_equals_segment_anything_per_image(pool):
    images, samples = pool
    torch.manual_seed(0)
    sam = build_sam("tiny")
    with torch.no_grad():
        embeddings = sam.image_encoder(sam_pixels(sam, images[:3]))
        masks = [torch.from_numpy(s.masks) for s in samples[:3]]
        points = [point_prompts(m, None) for m in masks]
        reference = torch.cat([predict_masks(sam, embeddings[b : b + 1], points=points[b])[0] for b in range(3)])
        all_points = torch.cat(points)
        sparse, dense = sam.prompt_encoder(points=(all_points, torch.ones(all_points.shape[:2], dtype=torch.int)), boxes=None, masks=None)
        ids = torch.tensor([b for b in range(3) for _ in range(len(masks[b]))])
        batched, _ = decode_batched(sam, embeddings, ids, sparse, dense)
    torch.testing.assert_close(batched, reference, atol=1e-5, rtol=1e-5)


def test_clip_round_trip_through_open_clip_and_wrapper(tmp_path, pool):
    images, samples = pool
    torch.manual_seed(1)
    model = build_clip().eval()
    folder = save_clip(model, tmp_path / "clip")
    loaded = open_clip.create_model(f"local-dir:{folder}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(normalize_clip(images)), model.encode_image(normalize_clip(images)))
        torch.testing.assert_close(loaded.encode_text(tokenizer([s.caption for s in samples])),
                                   model.encode_text(tokenize([s.caption for s in samples])))
        wrapped = OpenClipEncoder(f"local-dir:{folder}").freeze()(_images01(images))
        torch.testing.assert_close(wrapped.summary, model.encode_image(normalize_clip(images)), atol=1e-4, rtol=1e-4)
    assert wrapped.dense.shape == (8, 64, 8, 8)


def test_dino_round_trip_through_timm_and_wrapper(tmp_path, pool):
    images, _ = pool
    torch.manual_seed(2)
    backbone = build_dino_vit().eval()
    folder = save_dino(backbone, tmp_path / "dino")
    assert json.loads((folder / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 64, 64]
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    config = timm.data.resolve_data_config({}, model=loaded)
    pixels = (_images01(images) - torch.tensor(config["mean"]).view(1, 3, 1, 1)) / torch.tensor(config["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = backbone.forward_features(pixels)
        torch.testing.assert_close(loaded.forward_features(pixels), expected)
        wrapped = TimmEncoder(f"local-dir:{folder}", pretrained=True).freeze()(_images01(images))
    torch.testing.assert_close(wrapped.summary, expected[:, 0], atol=1e-4, rtol=1e-4)
    assert wrapped.dense.shape == (8, 96, 8, 8)


def test_sam_round_trip_through_build_sam_and_wrapper(tmp_path, pool):
    images, samples = pool
    torch.manual_seed(3)
    sam = build_sam("tiny")
    for p in sam.parameters():  # move away from the default init so a silent re-init would be caught
        p.data.add_(torch.randn_like(p) * 0.01)
    path = save_sam(sam, tmp_path / "sam.pth")
    loaded = build_sam("tiny", str(path))
    masks = torch.from_numpy(samples[0].masks)
    with torch.no_grad():
        a = sam.image_encoder(sam_pixels(sam, images[:2]))
        torch.testing.assert_close(loaded.image_encoder(sam_pixels(loaded, images[:2])), a)
        torch.testing.assert_close(predict_masks(loaded, a[:1], points=point_prompts(masks, None))[0],
                                   predict_masks(sam, a[:1], points=point_prompts(masks, None))[0])
        wrapped = SamEncoder("tiny", checkpoint=str(path)).freeze()(_images01(images[:2]))
    torch.testing.assert_close(wrapped.dense, a, atol=1e-4, rtol=1e-4)


def test_cache_builds_reuses_and_rebuilds(tmp_path, monkeypatch):
    folder = tmp_path / "toy"
    builds = []
    real_build = toy_cache.build_cache
    monkeypatch.setattr(toy_cache, "build_cache", lambda *a, **k: builds.append(1) or real_build(*a, **k))

    assert cache_status(folder, FAST) == "missing"
    ensure_cache(folder, FAST, progress=False)
    assert cache_status(folder, FAST) == "ok" and len(builds) == 1
    assert open_clip.create_model(f"local-dir:{folder / 'clip'}") is not None
    assert timm.create_model(f"local-dir:{folder / 'dino'}", pretrained=True) is not None
    assert build_sam("tiny", str(folder / "sam.pth")) is not None
    assert not list(tmp_path.glob("toy.building-*")) and not list(tmp_path.glob("toy.old-*"))

    ensure_cache(folder, FAST, progress=False)
    assert len(builds) == 1, "an up-to-date cache must be reused"

    (folder / "manifest.json").unlink()  # an interrupted build leaves no manifest
    assert cache_status(folder, FAST) == "incomplete"
    ensure_cache(folder, FAST, progress=False)
    assert len(builds) == 2 and cache_status(folder, FAST) == "ok"

    other = ToySettings(**{**FAST.__dict__, "clip_steps": 2})
    assert cache_status(folder, other) == "other settings"
    ensure_cache(folder, other, progress=False)
    assert len(builds) == 3 and cache_status(folder, other) == "ok" and cache_status(folder, FAST) == "other settings"
    assert json.loads((folder / "manifest.json").read_text())["settings"]["clip_steps"] == 2


def test_toy_path_uses_env_cache_dir_and_names(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv("UNITOWER_CACHE", str(tmp_path / "envcache"))
    monkeypatch.delenv("UNITOWER_TOY_PROFILE", raising=False)
    assert toy_cache.default_cache_dir() == tmp_path / "envcache"
    monkeypatch.setenv("UNITOWER_TOY_PROFILE", "smoke")
    assert toy_cache.default_cache_dir() == tmp_path / "envcache-smoke"
    monkeypatch.delenv("UNITOWER_TOY_PROFILE")
    monkeypatch.setattr(toy_cache, "ensure_cache", lambda cache_dir=None: calls.append(cache_dir) or tmp_path / "built")
    assert toy_path("sam") == tmp_path / "built" / "sam.pth"
    assert toy_path("dino", "/elsewhere") == tmp_path / "built" / "dino"
    assert calls == [None, "/elsewhere"]
    with pytest.raises(ValueError, match="unknown toy item 'vit'"):
        toy_path("vit")


@pytest.mark.skipif(importlib.util.find_spec("distill.toy.lm") is None, reason="distill/toy/lm.py not written yet")
def test_cache_builds_loadable_lm(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = ToySettings(**{**FAST.__dict__, "include_lm": True})
    folder = ensure_cache(tmp_path / "toy", settings, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(folder / "lm")
    model = AutoModelForCausalLM.from_pretrained(folder / "lm")
    ids = tokenizer("a red circle.", return_tensors="pt").input_ids
    assert model(ids).logits.shape[:2] == ids.shape


def test_toy_schedule_and_optimizer_step():
    # 20 steps -> warmup 2: ramp (s+1)/2 capped by a cosine over all 20 steps.
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    schedule = toy_schedule(optimizer, 20)
    expected = [min((s + 1) / 2, 0.5 * (1 + np.cos(np.pi * s / 20))) for s in range(21)]
    seen = []
    for _ in range(21):
        seen.append(optimizer.param_groups[0]["lr"])
        # gradient (10, 0, 0) has norm 10 -> clipped to norm 2; SGD moves by lr * clipped gradient
        before = weight.detach().clone()
        value = optimizer_step((weight * torch.tensor([10.0, 0.0, 0.0])).sum(), optimizer, schedule, max_norm=2.0)
        assert value == pytest.approx(float((before * torch.tensor([10.0, 0.0, 0.0])).sum()))
        assert torch.allclose(before - weight.detach(), torch.tensor([2.0 * seen[-1], 0.0, 0.0]), atol=1e-6)
    assert seen == pytest.approx(expected)
    assert seen[0] == pytest.approx(0.5) and seen[10] == pytest.approx(0.5) and seen[20] == pytest.approx(0.0)


def test_cache_built_in_worker_processes_equals_the_one_process_build(tmp_path):
    """Stages seed themselves: two worker processes (one thread each) write the same teachers as one process."""
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    one = toy_cache.build_cache(tmp_path / "one", FAST, progress=False, workers=1)
    two = toy_cache.build_cache(tmp_path / "two", FAST, progress=False, workers=2)
    for name in ("clip/open_clip_model.safetensors", "dino/model.safetensors"):
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = torch.load(one / "sam.pth", weights_only=True), torch.load(two / "sam.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((two / "manifest.json").read_text())
    assert set(manifest["stage_seconds"]) == {"clip", "dino", "sam"} and manifest["hash"] == FAST.digest()
