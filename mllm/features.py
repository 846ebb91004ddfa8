"""Frozen-feature cache: a frozen tower's visual tokens for a set of toy-world images, computed once.

A frozen tower gives the same tokens for the same image at every step and seed, so the study computes
them once per (tower, image set) and the LLaVA loop then pays only for projector + LM:

    path = cache_features(tower, tower_config, seed=0, num_images=8000, image_size=64, folder="runs/features")
    source = ToySource(seed=0, num_images=8000, stage="finetune", features=str(path))
    model = LlavaModel(CachedTower(str(path)), lm)        # the tower passes the cached tokens through

A cache file is `<name>-<key>.safetensors` (tensor `tokens` [num_images, N, C], float32) with a JSON
beside it (`<name>-<key>.json`: seed, image_size, num_images, num_tokens, dim, the tower config). The
key hashes the tower config, the world (seed, image size, count, toy BUILD_VERSION) and the weights'
identity: every existing file or folder named in the config (size and modification time of each file)
and, for `toy:` names, the toy cache's manifest hash. Files are written atomically.

Controls (no tower): `oracle_tokens` builds tokens from the generator's ground truth (per-cell
coverage by each colour, texture and size, pooled to the grid like a tower's map) and `blind_tokens`
gives a constant, so the same LLaVA can be trained with perfect or with no image information;
`pixel_tokens` gives each grid cell's raw pixels (the probes' "what needs no learning" control).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from distill.common.io import save_json, save_safetensors
from distill.common.names import split_scheme
from distill.toy.cache import PROFILES, active_profile
from mllm.towers import VisionTower

FEATURES_VERSION = 2  # bump when a token builder (tower_tokens, oracle_tokens, blind_tokens) changes


def weights_identity(value: Any) -> list:
    """(path, size, mtime) of every existing file under the paths named in `value` (a config tree)."""
    found: list = []
    if isinstance(value, dict):
        for item in value.values():
            found += weights_identity(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            found += weights_identity(item)
    elif isinstance(value, str) and split_scheme(value)[0] == "toy":
        found.append(("toy", PROFILES[active_profile()].digest()))
    elif isinstance(value, str) and len(value) < 4096 and Path(value).exists():
        root = Path(value)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        found += [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return found


def feature_key(tower_config: dict, seed: int, num_images: int, image_size: int, max_objects: int = 4) -> str:
    """Hash of the tower config, the weights it names and the image set (see the module docstring)."""
    from distill.toy.cache import BUILD_VERSION

    payload = [tower_config, weights_identity(tower_config), seed, num_images, image_size, max_objects, BUILD_VERSION, FEATURES_VERSION]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def toy_images(seed: int, num_images: int, image_size: int, max_objects: int = 4) -> torch.Tensor:
    """The first `num_images` toy-world images of `seed` as float [num_images, 3, S, S] in [0, 1]."""
    from distill.toy.world import ToyWorld

    world = ToyWorld(seed=seed, image_size=image_size, max_objects=max_objects)
    pixels = np.stack([np.asarray(world[i].image) for i in range(num_images)])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)


@torch.inference_mode()
def tower_tokens(tower: VisionTower, images: torch.Tensor, batch_size: int = 256, desc: str = "features") -> torch.Tensor:
    """The frozen `tower`'s tokens [num_images, N, C] for float images [num_images, 3, S, S] in [0, 1]."""
    tower.eval()
    chunks = [tower(batch) for batch in tqdm(images.split(batch_size), desc=desc, leave=False, unit="batch")]
    return torch.cat(chunks).float()


def write_features(tokens: torch.Tensor, path: str | Path, info: dict) -> Path:
    """Write tokens [num_images, N, C] and their JSON description beside them (both atomically)."""
    path = Path(path)
    meta = {**info, "num_images": int(tokens.shape[0]), "num_tokens": int(tokens.shape[1]), "dim": int(tokens.shape[2])}
    save_safetensors({"tokens": tokens}, path)
    save_json(meta, path.with_suffix(".json"))
    return path


def cache_features(tokens_fn, name: str, config: dict, seed: int, num_images: int, image_size: int,
                   folder: str | Path, max_objects: int = 4) -> Path:
    """The cache file of `config` on this image set: reused if present, else `tokens_fn()` is computed
    ([num_images, N, C]) and written. `name` prefixes the file name (e.g. the variant)."""
    key = feature_key(config, seed, num_images, image_size, max_objects)
    path = Path(folder) / f"{name}-seed{seed}-{num_images}-{key}.safetensors"
    if path.is_file() and path.with_suffix(".json").is_file():
        return path
    info = {"name": name, "seed": seed, "image_size": image_size, "max_objects": max_objects, "config": config, "key": key}
    return write_features(tokens_fn(), path, info)


def features_info(path: str | Path) -> dict:
    """The JSON description of a cache file (raises naming the file when it is missing)."""
    meta = Path(path).with_suffix(".json")
    if not Path(path).is_file() or not meta.is_file():
        raise FileNotFoundError(f"cached features '{path}' (or its '{meta.name}') do not exist; the study writes them "
                                "with mllm.features.cache_features.")
    return json.loads(meta.read_text())


def load_features(path: str | Path, seed: int, image_size: int, num_images: int, max_objects: int = 4) -> torch.Tensor:
    """Tokens [num_images, N, C] of a cache file, checked against the image set that will index them."""
    info = features_info(path)
    held = (info["seed"], info["image_size"], info.get("max_objects", 4))
    if held != (seed, image_size, max_objects) or info["num_images"] < num_images:
        raise ValueError(f"cached features '{path}' hold {info['num_images']} images of (seed, size, max_objects) "
                         f"{held}, but the data asks for {num_images} images of {(seed, image_size, max_objects)}; "
                         "compute the features for this image set.")
    return load_file(str(path))["tokens"][:num_images]


class CachedTower(VisionTower):
    """A tower whose "images" are already its cached tokens [B, N, C] (from `cache_features`): it passes
    them through, so the LLaVA loop trains only projector + LM.

    Args:
        features: a cache file (the training images'); its JSON gives `dim` and `num_tokens`.
        standardize: z-score every channel with the mean / std of all tokens in `features` (fixed, the
            same statistics for the evaluation images), so every variant reaches the projector on one
            scale: raw towers differ by orders of magnitude, and a badly scaled input slows the LLaVA's
            learning far more than it limits it (see the study README).
        whiten: after standardizing, decorrelate the channels (ZCA: identity covariance of the training
            tokens, eigenvalues floored at WHITEN_FLOOR x their mean). An invertible linear map, so the tokens
            hold what they held; but a skill carried by low-variance directions (toy texture: ~4% of the
            CLIP tokens' variance) is then learned as fast as one carried by the top directions.
    """

    def __init__(self, features: str, standardize: bool = True, whiten: bool = False) -> None:
        super().__init__(trainable=False)
        info = features_info(features)
        self.features = features
        self.dim = int(info["dim"])
        self._num_tokens = int(info["num_tokens"])
        self.input_size = (int(info["image_size"]),) * 2
        mean, std, rotation = torch.zeros(self.dim), torch.ones(self.dim), torch.eye(self.dim)
        if standardize or whiten:
            tokens = load_file(str(features))["tokens"].reshape(-1, self.dim).double()
            mean, std = tokens.mean(0), tokens.std(0).clamp_min(1e-6)
            if whiten:
                rotation = zca_matrix((tokens - mean) / std).float()
            mean, std = mean.float(), std.float()
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.register_buffer("rotation", rotation, persistent=False)
        self.whiten = whiten

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 3 or tuple(images.shape[1:]) != (self._num_tokens, self.dim):
            raise ValueError(f"CachedTower({self.features}) expects cached tokens [B, {self._num_tokens}, {self.dim}], "
                             f"got {tuple(images.shape)}; give the data source the same `features` file.")
        standardized = (images - self.mean) / self.std
        return standardized @ self.rotation if self.whiten else standardized


WHITEN_FLOOR = 0.01  # ZCA eigenvalue floor, relative to their mean: near-empty directions are not blown up


def zca_matrix(centered: torch.Tensor) -> torch.Tensor:
    """The symmetric whitening matrix [C, C] of centered vectors [M, C]: x @ W has (close to) identity covariance."""
    eigenvalues, vectors = torch.linalg.eigh(centered.T @ centered / max(1, len(centered) - 1))
    floor = WHITEN_FLOOR * eigenvalues.clamp_min(0).mean() + 1e-12
    return vectors @ torch.diag((eigenvalues.clamp_min(0) + floor).rsqrt()) @ vectors.T


def oracle_tokens(seed: int, num_images: int, image_size: int, grid: int, max_objects: int = 4) -> torch.Tensor:
    """Ground-truth tokens [num_images, grid*grid, 5 + sum of the attributes' class counts]: for each cell,
    0/1 indicators of the quadrant(s) it lies in (4: where the cell is, as a ViT's position embedding tells a
    tower), of an object touching it, and one-hot the class of each attribute of that object (the world's
    ATTRIBUTES in order: shape, colour, texture, size)."""
    from distill.toy.world import ATTRIBUTES, ToyWorld

    world = ToyWorld(seed=seed, image_size=image_size, max_objects=max_objects)
    half = image_size // 2
    where = torch.zeros(4, image_size, image_size)
    for quadrant in range(4):
        top, left = (quadrant // 2) * half, (quadrant % 2) * half
        where[quadrant, top:top + half, left:left + half] = 1.0
    offsets, channels = {}, 5  # after the 4 quadrant channels and the object channel
    for name, classes in ATTRIBUTES.items():
        offsets[name], channels = channels, channels + len(classes)
    maps = torch.zeros(num_images, channels, image_size, image_size)
    maps[:, :4] = where
    for index in range(num_images):
        sample = world[index]
        for obj, mask in zip(sample.objects, torch.from_numpy(sample.masks)):
            for channel in [4] + [offsets[name] + classes.index(getattr(obj, name)) for name, classes in ATTRIBUTES.items()]:
                maps[index, channel] += mask.float()
    # Max-pooled: a cell reads 1 for every attribute of an object that touches it (0/1 tokens, well scaled).
    return F.adaptive_max_pool2d(maps, (grid, grid)).flatten(2).transpose(1, 2).contiguous()


def blind_tokens(num_images: int, grid: int, dim: int = 16) -> torch.Tensor:
    """Constant tokens [num_images, grid*grid, dim] (zeros): the same LLaVA with no image information."""
    return torch.zeros(num_images, grid * grid, dim)


def pixel_tokens(images: torch.Tensor, grid: int, stride: int = 4) -> torch.Tensor:
    """Raw-pixel tokens [num_images, grid*grid, cell*cell*3 / stride] of images [num_images, 3, S, S] in [0, 1]:
    for each grid cell in row order, its pixels flattened as (row, column, channel) and every `stride`-th value
    kept."""
    n, channels, height, width = images.shape
    if height != width or height % grid:
        raise ValueError(f"pixel_tokens needs square images whose side is a multiple of grid={grid}; got "
                         f"{tuple(images.shape)}: pick a grid that divides the image size.")
    cell = height // grid
    cells = images.permute(0, 2, 3, 1).reshape(n, grid, cell, grid, cell, channels).permute(0, 1, 3, 2, 4, 5)
    return cells.reshape(n, grid * grid, cell * cell * channels)[..., ::stride].contiguous().float()
