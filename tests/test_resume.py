"""Exact mid-epoch resume (tests/test_resume.py).

Unit level: the sampler's global-batch split, per-sample seeded augmentation, and the loader's state
round trip. End to end: the toy distill recipe and a toy mllm align run are killed with SIGKILL at a
random step after a checkpoint, resumed with --ckpt_path, and must end bit-identical to an
uninterrupted run, having trained on exactly the same samples (none twice, none skipped).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import Dataset

from distill.data.resumable import GlobalBatchSampler, ResumableLoader, SeededSamples
from mllm.recipes import read_recipe

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 12, 3


class _RandomItems(Dataset):
    """Item i = (i, a random number drawn from the global torch generator)."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, index: int):
        return torch.tensor([float(index), torch.rand(()).item()])


def test_global_batches_split_across_ranks():
    single = GlobalBatchSampler(20, 4, seed=3)
    ranks = [GlobalBatchSampler(20, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(single) == len(ranks[0]) == 5
    for number in range(5):
        whole = single.batch(1, number)
        assert sorted(ranks[0].batch(1, number) + ranks[1].batch(1, number)) == sorted(whole)
        assert ranks[1].batch(1, number) == whole[1::2]
    assert single.order(0).tolist() != single.order(1).tolist()  # a new permutation each epoch
    assert len(GlobalBatchSampler(21, 4, drop_last=False)) == 6  # the last batch holds 1 sample
    assert len(GlobalBatchSampler(21, 2, drop_last=False, rank=1, world_size=2)) == 5  # 1 sample, 2 ranks: dropped
    assert len(GlobalBatchSampler(22, 2, drop_last=False, rank=1, world_size=2)) == 6
    assert sorted(single.order(1).tolist()) == list(range(20))


def test_sample_randomness_depends_only_on_seed_epoch_index():
    data = SeededSamples(_RandomItems(), seed=5)
    torch.manual_seed(0)
    first = data[(2, 7)]
    torch.rand(100)  # the global generator moves on; the sample does not change
    assert torch.equal(data[(2, 7)], first)
    assert not torch.equal(data[(3, 7)], first)
    state = torch.get_rng_state()
    data[(0, 1)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched


def test_sample_seeding_touches_only_the_cpu_generator(monkeypatch):
    """Per-sample seeding draws what torch.manual_seed(seed) would on the CPU, and never seeds CUDA (a queued
    CUDA reseed costs a stack trace per sample on CPU machines and would reseed a training GPU's dropout)."""
    from distill.data.resumable import sample_seed

    torch.manual_seed(sample_seed(5, 2, 7))
    expected = torch.rand(())
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: pytest.fail("sample seeding reseeded CUDA"))
    assert SeededSamples(_RandomItems(), seed=5)[(2, 7)][1] == expected


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_state_round_trip(workers):
    def make():
        return ResumableLoader(_RandomItems(), batch_size=3, seed=1, num_workers=workers)

    full = make()
    batches = [b for _ in range(2) for b in full]  # two epochs of 6 batches
    assert len(batches) == 12
    interrupted = make()
    it = iter(interrupted)
    seen = [next(it) for _ in range(4)]
    state = interrupted.state_dict()
    assert state == {"epoch": 0, "position": 4, "iterable": False}
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)
    assert len(seen + rest) == 12
    assert all(torch.equal(a, b) for a, b in zip(seen + rest, batches))


# ---- end to end: kill -9 and resume ---------------------------------------------------------------


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), UNITOWER_TOY_PROFILE="smoke", OMP_NUM_THREADS="1")
    env.setdefault("UNITOWER_CACHE", str(Path.home() / ".cache/unitower/toyworld"))
    return env


def _trainer(root: Path, ids: Path) -> dict:
    return {
        "accelerator": "cpu", "devices": 1, "max_steps": STEPS, "limit_val_batches": 0, "logger": False,
        "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(root),
        "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(root / "ckpt"), "save_last": True, "every_n_train_steps": EVERY}},
            {"class_path": "distill.data.resumable.RecordSampleIds", "init_args": {"path": str(ids)}},
        ],
    }


def distill_config(root: Path, ids: Path, workers: int, shards: str | None = None, ema_decay: float | None = None) -> Path:
    """The toy distill recipe, shrunk: 40 images, batch 8 (5 batches an epoch), 12 steps; `shards`: read
    the training images from these webdataset shards in order (no resampling, no shuffle buffer); `ema_decay`:
    keep a student EMA (in the checkpoint's state_dict, so the comparison below covers it)."""
    cfg = yaml.safe_load((ROOT / "configs/distill/toy.yaml").read_text())
    cfg["trainer"] = _trainer(root, ids)
    cfg["data"].update(batch_size=8, num_workers=workers)
    cfg["data"]["train"]["init_args"]["length"] = 40
    if shards:
        cfg["data"]["train"] = {"class_path": "distill.data.ShardImages",
                                "init_args": {"urls": shards, "resampled": False, "shuffle_buffer": 0}}
    cfg["model"]["student"]["init_args"]["model_args"].update(embed_dim=48, depth=2)
    cfg["model"].update(adaptor_hidden_dim=32, warmup_steps=2, ema_decay=ema_decay)
    path = root.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def mllm_config(root: Path, ids: Path, workers: int) -> Path:
    """The toy CLIP align recipe, shrunk: 24 images, batch 4 (6 batches an epoch), 12 steps."""
    cfg = read_recipe(ROOT / "configs/mllm/toy_align.yaml")
    cfg["trainer"] = _trainer(root, ids)
    cfg["data"].update(batch_size=4, num_workers=workers, val=None)
    cfg["data"]["train"]["init_args"]["num_images"] = 24
    path = root.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def mllm_whiten_config(root: Path, ids: Path, workers: int) -> Path:
    """mllm_config with the tower's norm "whiten": its statistics are measured at the start and must be restored
    (not measured again on another state) on resume."""
    path = mllm_config(root, ids, workers)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["tower"]["init_args"]["norm"] = "whiten"
    cfg["model"]["norm_calibration_images"] = 16
    path.write_text(yaml.safe_dump(cfg))
    return path


def mllm_dropout_config(root: Path, ids: Path, workers: int) -> Path:
    """The toy LoRA finetune recipe, shrunk, with LoRA dropout 0.1: training itself draws random numbers."""
    cfg = read_recipe(ROOT / "configs/mllm/toy_finetune_lora.yaml")
    cfg["trainer"] = _trainer(root, ids)
    cfg["model"].update(init_from=None, lora={"r": 4, "alpha": 8, "dropout": 0.1})
    cfg["data"].update(batch_size=4, num_workers=workers, val=None)
    cfg["data"]["train"]["init_args"]["num_images"] = 24
    path = root.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def _command(package: str, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", package, "fit", "-c", str(config), *extra]


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]


def _read_ids(path: Path) -> list[tuple[int, list[str]]]:
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(int(parts[0]), parts[1:]) for parts in lines]


def _run_and_kill(cmd: list[str], ids: Path, kill_step: int) -> None:
    """Start `cmd` and SIGKILL it as soon as it has started training step `kill_step`."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None:
            if ids.exists() and any(step >= kill_step for step, _ in _read_ids(ids)):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == -signal.SIGKILL, f"the run ended before step {kill_step}: {stderr[-3000:]}"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("package", ["distill", "mllm", "distill-shards", "mllm-lora-dropout", "distill-ema", "mllm-whiten"])
@pytest.mark.parametrize("workers", [0, 2])
def test_kill9_resume_is_bit_identical(tmp_path, package, workers):
    make = {"distill": distill_config, "mllm": mllm_config, "mllm-lora-dropout": mllm_dropout_config,
            "distill-ema": partial(distill_config, ema_decay=0.8), "mllm-whiten": mllm_whiten_config}.get(package)
    if package == "distill-ema":
        package = "distill"
    if package in ("mllm-lora-dropout", "mllm-whiten"):
        package = "mllm"
    if package == "distill-shards":  # 2 shards of 20 toy images, read in order: a deterministic stream
        from distill.toy.shards import export_shards
        from distill.toy.world import ToyWorld

        export_shards(ToyWorld(seed=0), tmp_path / "shards", count=40, shard_size=20)
        urls = str(tmp_path / "shards" / "{000000..000001}.tar")
        package, make = "distill", lambda root, ids, workers: distill_config(root, ids, workers, shards=urls)
    # uninterrupted
    ref_ids = tmp_path / "ref_ids.txt"
    _run(_command(package, make(tmp_path / "ref", ref_ids, workers)))
    # killed at a random step after the first checkpoint (step EVERY), then resumed
    kill_step = random.randrange(EVERY + 1, STEPS - 1)
    killed_ids, resumed_ids = tmp_path / "killed_ids.txt", tmp_path / "resumed_ids.txt"
    _run_and_kill(_command(package, make(tmp_path / "run", killed_ids, workers)), killed_ids, kill_step)
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    resumed_from = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert EVERY <= resumed_from <= kill_step
    _run(_command(package, make(tmp_path / "run", resumed_ids, workers), "--ckpt_path", str(last)))

    expected, final = _weights(tmp_path / "ref" / "ckpt" / "last.ckpt"), _weights(last)
    assert expected.keys() == final.keys()
    if isinstance(make, partial):
        assert final["ema.student.n_averaged"].item() == STEPS  # the EMA is in the compared weights
    if make is mllm_whiten_config:  # the measured statistics are in every checkpoint
        assert any(".token_stats." in k and k.endswith(".matrix") for k in expected)
    diff = max((expected[k].float() - final[k].float()).abs().max().item() for k in expected)
    assert all(torch.equal(expected[k], final[k]) for k in expected), (
        f"{package}, {workers} workers, killed at step {kill_step}, resumed from {resumed_from}: max abs diff {diff}")

    # the samples behind the final weights: the killed run's steps before its checkpoint + the resumed steps
    reference = _read_ids(ref_ids)
    trained = [(s, ids) for s, ids in _read_ids(killed_ids) if s < resumed_from] + _read_ids(resumed_ids)
    assert [s for s, _ in trained] == list(range(STEPS))
    assert trained == reference
    flat = [i for _, ids in trained for i in ids]
    assert len(flat) == len(set(flat)), "a sample was trained twice"  # ids are (epoch, index); none for shards
    print(f"{package} workers={workers}: killed at step {kill_step}, resumed from {resumed_from}, "
          f"max abs diff {diff}, {len(flat)} samples, 0 repeated, 0 skipped")


# ---- run folders, atomic checkpoints, file modes, stale temp files ---------------------------------


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=False)
    return int(proc.stdout)


def test_atomic_write_gives_normal_mode_and_stale_temps_are_removed(tmp_path):
    from distill.common.io import atomic_write, remove_stale_temps

    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "a.ckpt", lambda tmp: Path(tmp).write_bytes(b"x"))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    dead = _dead_pid()
    stale = tmp_path / f".last.ckpt.tmp-{dead}-abc123.tmp"
    live = tmp_path / f".last.ckpt.tmp-{os.getpid()}-def456.tmp"
    build = tmp_path / f"toy-smoke.building-{dead}"
    other = tmp_path / f"mine.old-{dead}"  # not the cache's: kept
    for p in (stale, live):
        p.write_bytes(b"partial")
    build.mkdir()
    other.mkdir()
    assert remove_stale_temps(tmp_path) == [stale]
    assert remove_stale_temps(tmp_path, build_dirs_of="toy-smoke") == [build]
    assert live.exists() and other.exists() and path.exists()


def test_mllm_cli_paths_follow_default_root_dir_and_saves_atomically(tmp_path):
    from distill.common.checkpoint_io import AtomicCheckpointIO
    from mllm.cli import make_cli

    cfg = read_recipe(ROOT / "configs/mllm/toy_align.yaml")
    cfg["data"]["train"]["init_args"]["num_images"] = 8
    config = tmp_path / "align.yaml"
    config.write_text(yaml.safe_dump(cfg))
    old = os.environ.get("UNITOWER_TOY_PROFILE")
    os.environ["UNITOWER_TOY_PROFILE"] = "smoke"
    try:
        trainer = make_cli(["-c", str(config), "--trainer.default_root_dir", str(tmp_path / "elsewhere")], run=False).trainer
    finally:
        if old is None:
            os.environ.pop("UNITOWER_TOY_PROFILE")
        else:
            os.environ["UNITOWER_TOY_PROFILE"] = old
    assert Path(trainer.checkpoint_callback.dirpath) == tmp_path / "elsewhere"
    assert Path(trainer.logger.save_dir) == tmp_path / "elsewhere"
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


@pytest.mark.slow
def test_distill_fit_writes_below_default_root_dir(tmp_path):
    cfg = yaml.safe_load(distill_config(tmp_path / "unused", tmp_path / "ids.txt", 0).read_text())
    cfg["trainer"].update(max_steps=2, logger=True, log_every_n_steps=1, default_root_dir="runs/distill/toy")  # the recipe's own value
    cfg["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                    "init_args": {"save_last": True, "every_n_train_steps": 1}}]
    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump(cfg))
    root = tmp_path / "moved"
    root.mkdir()
    stale = root / f".last.ckpt.tmp-{_dead_pid()}-abc.tmp"
    stale.write_bytes(b"partial")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    cmd = _command("distill", config, "--trainer.default_root_dir", str(root))
    done = subprocess.run(cmd, cwd=workdir, env=_env(), capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(workdir.iterdir()) == []  # nothing pinned to the working directory
    assert (root / "last.ckpt").is_file() and not stale.exists()
    assert (root / "last.ckpt").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert list(root.glob("lightning_logs/version_0/metrics.csv")) and list(root.glob("lightning_logs/version_0/config.yaml"))
    assert not list(root.glob(".*.tmp"))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _Stream(torch.utils.data.IterableDataset):
    """Items 0..10, split across workers; each with a random number from the global generator."""

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(worker, 11, workers):
            yield torch.tensor([float(i), torch.rand(()).item()])


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_state_counts_what_the_trainer_took(workers):
    taken = [0]

    def make():
        return ResumableLoader(_Stream(), batch_size=2, seed=1, num_workers=workers, consumed=lambda: taken[0])

    full = make()
    reference = list(full) + list(full)  # two passes; the second draws other random numbers
    assert not torch.equal(reference[0], reference[len(reference) // 2])
    loader = make()
    it = iter(loader)
    seen = [next(it), next(it), next(it)]  # like Lightning: the third batch is fetched ahead of training
    taken[0] = 2
    state = loader.state_dict()
    assert state == {"epoch": 0, "position": 2, "iterable": True}
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)
    assert all(torch.equal(a, b) for a, b in zip(seen[:2] + rest, reference)) and len(seen[:2] + rest) == len(reference)
    # the pass ended while the trainer still held its last batch, then after it trained it
    loader = make()
    batches = list(loader)
    taken[0] = len(batches) - 1
    assert loader.state_dict() == {"epoch": 0, "position": len(batches) - 1, "iterable": True}
    taken[0] = len(batches)
    assert loader.state_dict() == {"epoch": 1, "position": 0, "iterable": True}


@pytest.mark.parametrize("workers", [0, 2])
def test_loading_data_leaves_the_training_generators_alone(workers):
    """Training randomness (dropout) must not depend on when workers start or on augmentation draws."""
    torch.manual_seed(0)
    state = torch.get_rng_state()
    loader = ResumableLoader(_RandomItems(), batch_size=4, seed=1, num_workers=workers)
    list(loader)
    list(ResumableLoader(_Stream(), batch_size=4, seed=1, num_workers=workers))
    assert torch.equal(torch.get_rng_state(), state)


def test_data_module_state_restores_the_generators():
    import numpy as np

    from distill.data import DistillDataModule, ToyImages

    dm = DistillDataModule(train=ToyImages(length=8), image_size=32, batch_size=4, num_workers=0)
    state = dm.state_dict()
    first = (torch.rand(3), np.random.rand(3), random.random())
    dm.load_state_dict(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and (first[1] == again[1]).all() and first[2] == again[2]


def test_shuffled_stream_resumes_on_a_fresh_stream_with_a_warning():
    loader = ResumableLoader(_Stream(), batch_size=2, seed=1, replay=False)
    loader.load_state_dict({"epoch": 0, "position": 2, "iterable": True})
    with pytest.warns(UserWarning, match="fresh stream"):
        batches = list(loader)
    assert batches[0][0, 0].item() == 0.0  # a fresh stream, not 2 batches in
    assert len(batches) == 6 and loader.epoch == 1
