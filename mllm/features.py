"""Frozen-feature cache: a frozen tower's raw per-encoder features for a set of toy-world images, computed once.

Frozen encoders give the same features for the same image at every step and seed, so the study computes
them once per (tower, image set) and the LLaVA loop then pays only for fusion + projector + LM:

    path = cache_features(lambda: tower_features(tower, images), "clip", tower_config, seed=0, num_images=8000,
                          image_size=64, folder="runs/features")
    source = ToySource(seed=0, num_images=8000, stage="finetune", features=str(path))
    model = LlavaModel(CachedTower(str(path), fusion="channel", norm="standardize"), lm)

What is stored is the tower's `features` (mllm/towers.py): one tensor [num_images, L_i, N_i, C_i] per
encoder (L_i layers where the fusion asks for several), before normalisation and fusion. CachedTower applies
the same `norm` rule and fusion module as the live tower, so a trainable fusion (MouSi, BRAVE, COMM) trains
on cached features. A cache file is `<name>-<key>.safetensors` (tensor `features` [num_images, D]: each
image's per-encoder tensors flattened and concatenated, float32, so a data source indexes one row per image)
with a JSON beside it (`<name>-<key>.json`: seed, image_size, num_images, `parts` [{layers, tokens, dim}] per
encoder, the tower config). The key hashes the tower config, the world (seed, image size, count, toy BUILD_VERSION) and the weights'
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
from mllm.fusion import Fusion, build_fusion
from mllm.towers import VisionTower, encoder_maps, resample_grid

FEATURES_VERSION = 3  # bump when a builder (tower_features, oracle_tokens, blind_tokens) or the layout changes


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
def tower_features(tower: VisionTower, images: torch.Tensor, batch_size: int = 256,
                   desc: str = "features") -> list[torch.Tensor]:
    """The frozen `tower`'s raw features, one [num_images, L_i, N_i, C_i] per encoder, for float images
    [num_images, 3, S, S] in [0, 1]."""
    tower.eval()
    chunks = [tower.features(batch) for batch in tqdm(images.split(batch_size), desc=desc, leave=False, unit="batch")]
    return [torch.cat([chunk[i] for chunk in chunks]).float() for i in range(len(chunks[0]))]


@torch.inference_mode()
def encoder_dense_maps(encoder, images: torch.Tensor, layer: int | None = None, batch_size: int = 256,
                       desc: str = "features") -> torch.Tensor:
    """A frozen encoder's dense maps [num_images, C, h, w] at `layer` (None: its own `layer`) for float images
    [num_images, 3, S, S] in [0, 1], `batch_size` images per forward (as `tower_features`)."""
    encoder.eval()
    layers = None if layer is None else [layer]
    chunks = [encoder_maps(encoder, batch, layers)[0] for batch in tqdm(images.split(batch_size), desc=desc, leave=False, unit="batch")]
    return torch.cat(chunks).float()


def write_features(features: list[torch.Tensor] | torch.Tensor, path: str | Path, info: dict) -> Path:
    """Write per-encoder features ([num_images, L_i, N_i, C_i] each; a single [num_images, N, C] tensor is one
    encoder with one layer) and their JSON description beside them (both atomically)."""
    path = Path(path)
    if isinstance(features, torch.Tensor):
        features = [features[:, None]]
    parts = [{"layers": int(f.shape[1]), "tokens": int(f.shape[2]), "dim": int(f.shape[3])} for f in features]
    flat = torch.cat([f.reshape(len(f), -1) for f in features], dim=1).float().contiguous()
    meta = {**info, "num_images": int(flat.shape[0]), "parts": parts}
    save_safetensors({"features": flat}, path)
    save_json(meta, path.with_suffix(".json"))
    return path


def split_features(flat: torch.Tensor, parts: list[dict]) -> list[torch.Tensor]:
    """Rows [B, D] of a cache file back into per-encoder features [B, L_i, N_i, C_i] (`parts` from its JSON)."""
    sizes = [p["layers"] * p["tokens"] * p["dim"] for p in parts]
    if flat.dim() != 2 or flat.shape[1] != sum(sizes):
        raise ValueError(f"cached features must be rows [B, {sum(sizes)}] (parts {parts}), got {tuple(flat.shape)}; "
                         "give the data source the same `features` file as the CachedTower.")
    return [chunk.reshape(len(flat), p["layers"], p["tokens"], p["dim"]) for chunk, p in zip(flat.split(sizes, 1), parts)]


def cache_features(features_fn, name: str, config: dict, seed: int, num_images: int, image_size: int,
                   folder: str | Path, max_objects: int = 4) -> Path:
    """The cache file of `config` on this image set: reused if present, else `features_fn()` is computed
    (per-encoder features, or one [num_images, N, C] tensor) and written. `name` prefixes the file name."""
    key = feature_key(config, seed, num_images, image_size, max_objects)
    path = Path(folder) / f"{name}-seed{seed}-{num_images}-{key}.safetensors"
    if path.is_file() and path.with_suffix(".json").is_file():
        return path
    info = {"name": name, "seed": seed, "image_size": image_size, "max_objects": max_objects, "config": config, "key": key}
    return write_features(features_fn(), path, info)


def features_info(path: str | Path) -> dict:
    """The JSON description of a cache file (raises naming the file when it is missing)."""
    meta = Path(path).with_suffix(".json")
    if not Path(path).is_file() or not meta.is_file():
        raise FileNotFoundError(f"cached features '{path}' (or its '{meta.name}') do not exist; the study writes them "
                                "with mllm.features.cache_features.")
    info = json.loads(meta.read_text())
    if "parts" not in info:
        raise ValueError(f"cached features '{path}' are in an older layout (no `parts`); delete the file and let the "
                         "study compute it again.")
    return info


def load_features(path: str | Path, seed: int, image_size: int, num_images: int, max_objects: int = 4) -> torch.Tensor:
    """Rows [num_images, D] of a cache file (see the module docstring), checked against the image set that will
    index them."""
    info = features_info(path)
    held = (info["seed"], info["image_size"], info.get("max_objects", 4))
    if held != (seed, image_size, max_objects) or info["num_images"] < num_images:
        raise ValueError(f"cached features '{path}' hold {info['num_images']} images of (seed, size, max_objects) "
                         f"{held}, but the data asks for {num_images} images of {(seed, image_size, max_objects)}; "
                         "compute the features for this image set.")
    return load_file(str(path))["features"][:num_images]


def grid_tokens(flat: torch.Tensor, parts: list[dict], grid: int) -> torch.Tensor:
    """Every encoder's last cached layer on a grid x grid map, concatenated along channels -> [B, grid*grid,
    sum(C_i)] (what the probes read: the same for every fusion of the same encoders)."""
    maps = []
    for tokens in split_features(flat, parts):
        tokens = tokens[:, -1]
        side = int(round(tokens.shape[1] ** 0.5))
        if side * side != tokens.shape[1]:
            raise ValueError(f"grid_tokens needs square token maps; a cached part has {tokens.shape[1]} tokens "
                             "(a CLS token?).")
        dense = tokens.transpose(1, 2).reshape(len(tokens), -1, side, side)
        maps.append(resample_grid(dense, (grid, grid)).flatten(2).transpose(1, 2))
    return torch.cat(maps, dim=-1)


class CachedTower(VisionTower):
    """A tower whose "images" are already its cached features (rows [B, D] from `cache_features`): it splits them
    per encoder and applies the live tower's `norm` rule and fusion, so the LLaVA loop trains only fusion +
    projector + LM and the projector sees what the live tower would give.

    Args:
        features: a cache file (the training images'); its JSON gives the per-encoder shapes.
        fusion: the live tower's fusion (a registered name or an mllm.fusion.Fusion config); "channel" for a
            single encoder passes its tokens through.
        grid: the live tower's `grid` (the resampler's K = grid*grid); the cached maps are already resampled.
        norm: the live tower's `norm` ("none", "layernorm", "standardize" or "whiten"); the last two measure their
            statistics on the same calibration images as the live tower would (LlavaModule), so both agree.
    """

    def __init__(self, features: str, fusion: Fusion | str = "channel", grid: int | None = None,
                 norm: str = "none") -> None:
        super().__init__(trainable=False, norm=norm)
        info = features_info(features)
        self.features_path = features
        self.parts = info["parts"]
        self.input_size = (int(info["image_size"]),) * 2
        self.fusion = build_fusion(fusion)
        if self.fusion.layers is not None:
            held = [p["layers"] for p in self.parts]
            if [len(chosen) for chosen in self.fusion.layers] != held:
                raise ValueError(f"CachedTower({features}): the fusion asks for layers {self.fusion.layers} but the cache "
                                 f"holds {held} layers per encoder; cache the features with the same fusion config.")
        self.fusion.bind([p["dim"] for p in self.parts], grid)
        self.dim = self.fusion.dim
        self._init_token_stats([(p["layers"], p["dim"]) for p in self.parts])
        self.row_size = sum(p["layers"] * p["tokens"] * p["dim"] for p in self.parts)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.dim() != 2 or images.shape[1] != self.row_size:
            raise ValueError(f"CachedTower({self.features_path}) expects cached feature rows [B, {self.row_size}], "
                             f"got {tuple(images.shape)}; give the data source the same `features` file.")
        return split_features(images, self.parts)

    @property
    def num_tokens(self) -> int:
        if self._num_tokens is None:
            parameter = next(self.parameters(), None)
            row = torch.zeros(1, self.row_size, device=parameter.device if parameter is not None else "cpu")
            with torch.inference_mode():  # the norm rule keeps shapes (and may not be calibrated yet)
                self._num_tokens = int(self.fusion(self.features(row)).shape[1])
        return self._num_tokens


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
