"""Build, reuse or rebuild the toy world cache (tiny CLIP / DINO / SAM teachers + tiny LM), and find its files.

Layout of a cache directory (default: $UNITOWER_CACHE, else ~/.cache/unitower/toyworld):

    clip/            open_clip local-dir folder   -> open_clip.create_model('local-dir:' + path)
    dino/            timm local-dir folder        -> timm.create_model('local-dir:' + path, pretrained=True)
    sam.pth          Sam state dict (official fmt) -> distill.encoders.sam.build_sam('tiny', path)
    lm/              Hugging Face folder          -> AutoModelForCausalLM / AutoTokenizer.from_pretrained(path)
    manifest.json    written LAST; holds the settings and their hash

A cache is used only when its manifest exists, its hash equals the hash of the current settings and
every listed file exists; otherwise (interrupted build, other settings, missing file) it is rebuilt.
Builds happen in a sibling temp folder that replaces the cache folder only when complete
(`distill.common.io.write_dir`); a lock file keeps two processes from building at once. `toy_path` is the
provider of 'toy:NAME' names in `distill.common.names`.

    from distill.toy.cache import toy_path
    toy_path("clip")        # builds the cache on first use (a few minutes, with progress bars)

    python -m distill.toy build [--cache DIR] [--force]
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from distill.common.io import remove_stale_temps, save_json, write_dir
from distill.toy.train_clip import train_clip
from distill.toy.train_dino import train_dino
from distill.toy.train_sam import train_sam
from distill.toy.world import TRAIN_SEED, ToyWorld, world_texts

# Bump when the generator or a trainer changes in a way that changes the teachers.
BUILD_VERSION = 5
TOY_FILES = {"clip": "clip", "dino": "dino", "sam": "sam.pth", "lm": "lm"}
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ToySettings:
    """Everything that determines the cache contents (its hash keys the cache).

    Args:
        clip_steps: optimizer steps of the toy CLIP.
        dino_steps: optimizer steps of the toy DINO.
        sam_steps: optimizer steps of the toy SAM.
        lm_steps: optimizer steps of the toy LM (None = build_toy_lm's default).
        num_samples: training-world images each vision teacher draws from.
        lm_texts: training-world samples whose caption and question/answer texts pretrain the LM.
        include_lm: build the LM stage (tests of the vision teachers turn it off).
        seed: seed of every trainer.
    """

    clip_steps: int = 700
    dino_steps: int = 300
    sam_steps: int = 500
    lm_steps: int | None = None
    num_samples: int = 6000
    lm_texts: int = 3000
    include_lm: bool = True
    seed: int = 0

    def digest(self) -> str:
        """Hash of the settings and BUILD_VERSION."""
        payload = json.dumps({"version": BUILD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def names(self) -> list[str]:
        return ["clip", "dino", "sam"] + (["lm"] if self.include_lm else [])


# Build profiles: "smoke" trains every teacher for a few steps, to check the whole route in CI.
PROFILES = {
    "default": ToySettings(),
    "smoke": ToySettings(clip_steps=15, dino_steps=15, sam_steps=15, lm_steps=40, num_samples=256, lm_texts=300),
}


def active_profile() -> str:
    """The build profile named by $UNITOWER_TOY_PROFILE ("default" when unset)."""
    name = os.environ.get("UNITOWER_TOY_PROFILE", "default")
    if name not in PROFILES:
        raise ValueError(f"UNITOWER_TOY_PROFILE={name!r} is unknown; use one of {sorted(PROFILES)}.")
    return name


def default_cache_dir() -> Path:
    """$UNITOWER_CACHE if set, else ~/.cache/unitower/toyworld; with a "-<profile>" suffix for non-default profiles."""
    env = os.environ.get("UNITOWER_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "unitower" / "toyworld"
    profile = active_profile()
    return base if profile == "default" else base.with_name(f"{base.name}-{profile}")


def cache_status(cache_dir: Path, settings: ToySettings) -> str:
    """'ok', or why the cache cannot be used: 'missing', 'incomplete' (no manifest), 'other settings',
    'damaged' (unreadable manifest or a listed file missing)."""
    if not cache_dir.exists():
        return "missing"
    manifest_file = cache_dir / MANIFEST
    if not manifest_file.is_file():
        return "incomplete"
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, json.JSONDecodeError):
        return "damaged"
    if manifest.get("hash") != settings.digest():
        return "other settings"
    if not all((cache_dir / TOY_FILES[name]).exists() for name in settings.names()):
        return "damaged"
    return "ok"


def build_stage(name: str, out: Path, settings: ToySettings, progress: bool = True, threads: int | None = None) -> float:
    """Train toy item `name` (clip, dino, sam or lm) with `settings` into `out`; returns its wall seconds.
    `threads`: torch threads for this stage (None: leave the process's setting)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    common = dict(seed=settings.seed, progress=progress)
    stages = {
        "clip": lambda: train_clip(out, steps=settings.clip_steps, num_samples=settings.num_samples, **common),
        "dino": lambda: train_dino(out, steps=settings.dino_steps, num_samples=settings.num_samples, **common),
        "sam": lambda: train_sam(out, steps=settings.sam_steps, num_samples=settings.num_samples, **common),
        "lm": lambda: _build_lm(out, settings),
    }
    start = time.time()
    stages[name]()
    return round(time.time() - start, 1)


def build_cache(cache_dir: Path, settings: ToySettings, progress: bool = True, workers: int = 2) -> Path:
    """Train every toy teacher (and the LM) into a temp folder, write the manifest last, then swap it
    into `cache_dir` (replacing whatever was there). Returns `cache_dir`.

    `workers` > 1 trains that many stages at once in separate processes with one torch thread each (the toy
    models' steps are dominated by per-op overhead, so two processes on two cores beat one with two threads);
    every stage seeds itself, so the stages do not depend on each other or on the order they run in."""
    import concurrent.futures
    import multiprocessing

    seconds: dict[str, float] = {}
    start = time.time()

    def build(build_dir: Path) -> None:
        names = settings.names()
        if progress:
            for name in names:
                print(f"[toy world] building {name} -> {build_dir / TOY_FILES[name]}", flush=True)
        if workers <= 1:
            for name in names:
                seconds[name] = build_stage(name, build_dir / TOY_FILES[name], settings, progress)
        else:
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {name: pool.submit(build_stage, name, build_dir / TOY_FILES[name], settings, progress, 1)
                           for name in names}
                for name, future in futures.items():
                    seconds[name] = future.result()
        manifest = {
            "hash": settings.digest(),
            "version": BUILD_VERSION,
            "settings": asdict(settings),
            "files": {name: TOY_FILES[name] for name in settings.names()},
            "stage_seconds": seconds,
            "build_seconds": round(time.time() - start, 1),
        }
        save_json(manifest, build_dir / MANIFEST)

    write_dir(cache_dir, build)
    if progress:
        print(f"[toy world] built {cache_dir} in {round(time.time() - start, 1)} s {seconds}", flush=True)
    return cache_dir


def _build_lm(out_dir: Path, settings: ToySettings) -> Path:
    from distill.toy.lm import build_toy_lm  # lazy: transformers is heavy and only this stage needs it

    texts = world_texts(ToyWorld(seed=TRAIN_SEED), settings.lm_texts)
    kwargs = {} if settings.lm_steps is None else {"steps": settings.lm_steps}
    return build_toy_lm(texts, out_dir, seed=settings.seed, **kwargs)


def ensure_cache(
    cache_dir: str | Path | None = None, settings: ToySettings | None = None, force: bool = False, progress: bool = True
) -> Path:
    """Return a usable cache folder, building (or rebuilding) it first when needed or when `force`.
    Without `settings`, the active profile's ($UNITOWER_TOY_PROFILE)."""
    settings = settings or PROFILES[active_profile()]
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    remove_stale_temps(folder.parent, build_dirs_of=folder.name)  # what killed builds left (live builders' are kept)
    if not force and cache_status(folder, settings) == "ok":
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits, then finds the finished cache
        status = cache_status(folder, settings)
        if force or status != "ok":
            if progress:
                print(f"[toy world] cache {folder}: {'forced rebuild' if force else status}; building.", flush=True)
            build_cache(folder, settings, progress=progress)
    return folder


def toy_path(name: str, cache_dir: str | None = None) -> Path:
    """Path of toy item `name` ('clip' folder, 'dino' folder, 'sam' .pth, 'lm' folder), building the
    cache first if it is missing, incomplete or from other settings."""
    if name not in TOY_FILES:
        raise ValueError(f"toy_path: unknown toy item {name!r}; use one of {sorted(TOY_FILES)} (e.g. 'toy:clip').")
    return ensure_cache(cache_dir) / TOY_FILES[name]
