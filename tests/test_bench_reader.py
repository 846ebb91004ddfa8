"""scripts/bench_reader.py's pieces that are not timings: the study's finetune config it builds, and a timed
hand-loop step of the real modules that trains (every section timed, the trained weights move)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from distill.toy.lm import build_toy_lm
from distill.toy.world import ToyWorld, world_texts

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_reader.py"
spec = importlib.util.spec_from_file_location("bench_reader", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_stage_config_is_the_studys_finetune_with_the_candidate_settings(tmp_path):
    cfg = bench.stage_cfg("/f.safetensors", 96, 7, tmp_path, precision="bf16-mixed", train_images=50,
                          overrides={"model.lm": "/lm", "model.lm_lr": 0.5})
    assert cfg["model"]["tower"] == {"class_path": "mllm.features.CachedTower", "init_args": {
        "features": "/f.safetensors", "fusion": "channel", "grid": 2, "norm": "standardize"}}
    assert cfg["model"]["init_from"] is None and cfg["model"]["stage"] == "finetune"
    assert (cfg["model"]["lm"], cfg["model"]["lm_lr"]) == ("/lm", 0.5)
    assert cfg["data"]["batch_size"] == 96 and cfg["trainer"]["precision"] == "bf16-mixed"
    assert cfg["trainer"]["max_steps"] == 7 and cfg["data"]["train"]["init_args"]["num_images"] == 50


def test_hand_loop_step_times_every_section_and_trains(tmp_path):
    lm = build_toy_lm(world_texts(ToyWorld(0, max_objects=1), 40), tmp_path / "lm", steps=2)
    features = bench.oracle_features(tmp_path / "features", 16)
    cfg = bench.stage_cfg(features, 4, 10**6, tmp_path / "run", train_images=16, overrides={"model.lm": str(lm)})
    loop = bench.HandLoop(bench.build(cfg, tmp_path / "run"), bf16=False, compiled=False)
    before = [p.detach().clone() for p in loop.module.parameters() if p.requires_grad]
    times = loop.step()
    assert set(times) == set(bench.SECTIONS) and all(t >= 0 for t in times.values())
    after = [p for p in loop.module.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
