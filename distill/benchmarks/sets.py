"""The images the in-training benchmarks score: a labelled k-NN bank and query set, zero-shot prompts, and images
with ground-truth masks. Built once per run (images kept as uint8, converted per batch).

    probe_set = toy_probe_set(image_size=64, num_bank=1000, num_query=500, num_masked=200)     # toy world
    probe_set = folder_probe_set("data/labelled", 224, num_bank=1000, num_query=500)            # ImageFolder layout

Toy world: bank = single-object training-world images (TRAIN_SEED), queries = single-object held-out images
(HELDOUT_SEED), labels = the object's texture / shape / colour, prompts "a {colour} {shape}." (the teacher skill
report's, distill/toy/skills.py), masked images = held-out multi-object images with their instance masks.

Labelled folder (torchvision ImageFolder layout, ROOT/<class>/<image>): with ROOT/train and ROOT/val class folders
the bank comes from train and the queries from val; otherwise one seeded shuffle of ROOT's images gives the queries
(first `num_query`) and the bank (next `num_bank`). Class names (folder names, '_' as space) fill the zero-shot
templates. Images: shorter side resized to `image_size`, centre square crop. No masks: the SAM probe is toy-only.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.folder import find_classes
from torchvision.transforms.functional import pil_to_tensor

from distill.data.sources import IMAGE_EXTENSIONS
from distill.common.decode import decode_image
from distill.encoders.resize import resize_center_crop
from distill.common.skips import Skipped
from distill.toy.skills import object_labels, shape_prompts
from distill.toy.world import HELDOUT_SEED, TRAIN_SEED, sample_pool


@dataclass
class LabelledImages:
    """images: uint8 [N, 3, S, S]; labels: {attribute: one class name per image}."""

    images: torch.Tensor
    labels: dict[str, list[str]]


@dataclass
class ProbeSet:
    """Everything the probes score on.

    bank, query: the k-NN bank and the query images (queries also used for zero-shot), same attributes.
    knn_attributes: the attributes k-NN is scored on (keys `bench/knn_<attribute>/...`).
    prompts, prompt_classes: zero-shot prompt texts and {attribute: the class each prompt names}
        (keys `bench/zeroshot_<attribute>/...`).
    masked_images, masks: uint8 [M, 3, S, S] and one bool [N_m, S, S] mask tensor per image (None: no masks).
    """

    bank: LabelledImages
    query: LabelledImages
    knn_attributes: list[str]
    prompts: list[str]
    prompt_classes: dict[str, list[str]]
    masked_images: torch.Tensor | None = None
    masks: list[torch.Tensor] | None = None


def _toy_images(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def toy_probe_set(image_size: int, num_bank: int, num_query: int, num_masked: int) -> ProbeSet:
    """The toy world's probe set at `image_size` (see the module docstring)."""
    attributes = ("texture", "shape", "color")

    def labelled(seed: int, count: int) -> LabelledImages:
        images, samples = sample_pool(seed, count, image_size=image_size, max_objects=1)
        return LabelledImages(_toy_images(images), {a: object_labels(samples, a) for a in attributes})

    prompts, prompt_classes = shape_prompts()
    masked_images, masks = None, None
    if num_masked:
        images, samples = sample_pool(HELDOUT_SEED, num_masked, image_size=image_size)
        masked_images, masks = _toy_images(images), [torch.from_numpy(s.masks) for s in samples]
    return ProbeSet(labelled(TRAIN_SEED, num_bank), labelled(HELDOUT_SEED, num_query), ["texture", "shape"],
                    prompts, prompt_classes, masked_images, masks)


def _class_files(root: Path) -> tuple[list[str], list[tuple[Path, str]]]:
    classes, _ = find_classes(str(root))
    files = [(path, name) for name in classes for path in sorted((root / name).rglob("*"))
             if path.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) below the class folders of {root}.")
    return classes, files


def _load(files: list[tuple[Path, str]], image_size: int) -> LabelledImages:
    images, labels, skipped = [], [], []
    for path, name in files:
        image = decode_image(path, str(path))
        if isinstance(image, Skipped):
            skipped.append(str(path))
            continue
        pixels = pil_to_tensor(image).unsqueeze(0).float() / 255.0
        pixels = resize_center_crop(pixels, image_size)
        images.append((pixels * 255.0).round().clamp(0, 255).to(torch.uint8))
        labels.append(name)
    if skipped:
        warnings.warn(f"benchmark images: skipped {len(skipped)} unreadable files, e.g. {skipped[:3]}", stacklevel=2)
    if not images:
        raise FileNotFoundError(f"No readable benchmark images among {len(files)} files (e.g. {files[0][0]}).")
    return LabelledImages(torch.cat(images), {"class": labels})


def folder_probe_set(root: str | Path, image_size: int, num_bank: int, num_query: int,
                     templates: list[str] | tuple[str, ...] = ("a photo of a {}.",), seed: int = 0) -> ProbeSet:
    """A probe set from a labelled image folder (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"labelled_folder {root} does not exist; give a folder of class subfolders "
                                "(ROOT/<class>/<image>, or ROOT/train/<class>/... and ROOT/val/<class>/...).")
    shuffle = random.Random(seed).shuffle
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes, bank_files = _class_files(root / "train")
        _, query_files = _class_files(root / "val")
        shuffle(bank_files)
        shuffle(query_files)
        bank_files, query_files = bank_files[:num_bank], query_files[:num_query]
    else:
        classes, files = _class_files(root)
        if len(classes) < 2:
            raise ValueError(f"labelled_folder {root} has {len(classes)} class folder(s); k-NN needs at least 2.")
        shuffle(files)
        query_files, bank_files = files[:num_query], files[num_query : num_query + num_bank]
        if not bank_files:
            raise ValueError(f"labelled_folder {root} has {len(files)} images, all used as queries "
                             f"(num_query={num_query}); lower num_query or add images.")
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise ValueError(f"zeroshot_templates {list(templates)} must each hold '{{}}' for the class name.")
    names = {name: name.replace("_", " ") for name in classes}
    prompts = [template.format(names[name]) for name in classes for template in templates]
    prompt_classes = {"class": [name for name in classes for _ in templates]}
    return ProbeSet(_load(bank_files, image_size), _load(query_files, image_size), ["class"], prompts, prompt_classes)
