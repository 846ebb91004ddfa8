"""The toy study's measuring instrument: what the towers know and what a blind answerer gets, independent of
any LLaVA run. `Features` caches every variant's frozen tokens (towers, and the `blind` / `oracle` controls
with no tower), `probe_variant` fits the linear probes on them (also on the probe-only controls: untrained towers and raw
pixels), `questions` lists the held-out questions
every run answers and `text_prior` scores the best image-blind answerer.

    features = Features(study, budget, out_dir, students)
    paths = features.paths(variant, seed)                  # {world seed: cache file}
    probe = probe_variant(paths, study, budget, objects)  # {kind: accuracy, "overall": ...}
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mllm.study.config import Budget, Study, Variant
from mllm.study.cost import tower_cost
from mllm.study.common import build_tower, variant_tower


class Features:
    """Cached tokens (train + eval images) of every variant and seed, computed on first request."""

    def __init__(self, study: Study, budget: Budget, out_dir: Path, students: dict[str, dict[int, str]]) -> None:
        self.study, self.budget, self.students = study, budget, students
        self.folder = out_dir / "features"
        self._images: dict[int, torch.Tensor] = {}
        self._towers: dict[str, object] = {}
        self._maps: dict[tuple, torch.Tensor] = {}  # (encoder config, layer, world) -> dense maps [N, C, h, w]
        self.costs: dict[str, dict] = {}

    def images(self, seed: int) -> torch.Tensor:
        from mllm.features import toy_images

        if seed not in self._images:
            count = self.budget.train_images if seed == 0 else self.budget.eval_images
            self._images[seed] = toy_images(seed, count, self.study.image_size, self.study.max_objects)
        return self._images[seed]

    def tower(self, config: dict):
        """The tower of `config`, built once."""
        key = json.dumps(config, sort_keys=True, default=str)
        if key not in self._towers:
            self._towers[key] = build_tower(config)
        return self._towers[key]

    def tower_config(self, variant: Variant, seed: int) -> dict | None:
        """The variant's live tower config (grid, norm and student filled in); None for a control."""
        if variant.kind == "control":
            return None
        student = self.students.get(variant.name, {}).get(seed) if variant.kind == "student" else None
        return variant_tower(variant, self.study, student)

    def paths(self, variant: Variant, seed: int) -> dict[int, str]:
        """{world seed: cache file} for the training (0) and held-out (1000) images; measures the tower's
        cost (parameters, GFLOPs, ms per image, its fusion's share) the first time a variant is seen."""
        from mllm.features import blind_tokens, oracle_tokens

        size, grid = self.study.image_size, self.study.grid or 8
        if variant.kind == "control":
            config = {"control": variant.control, "grid": grid}
            make = {"blind": lambda world, n: blind_tokens(n, grid),
                    "oracle": lambda world, n: oracle_tokens(world, n, size, grid, self.study.max_objects)}[variant.control]
            self.costs.setdefault(variant.name, {"tower_params_m": 0.0, "gflops_per_image": 0.0, "ms_per_image": 0.0,
                                                 "fusion_params_m": 0.0, "fusion_gflops_per_image": 0.0})
        else:
            tower_config = self.tower_config(variant, seed)
            tower = self.tower(tower_config)
            if variant.name not in self.costs:
                self.costs[variant.name] = tower_cost(tower, size)
            config = features_config(tower_config, tower)

            def make(world: int, n: int) -> list[torch.Tensor]:
                return self.tower_features(tower_config, tower, world, f"{variant.name} features")
        return self._cache(variant.name, config, make)

    def tower_features(self, tower_config: dict, tower, world: int, desc: str) -> list[torch.Tensor]:
        """`mllm.features.tower_features` of the tower on world `world`'s images, with each encoder's dense maps
        computed once per (encoder config, layer) and shared by every tower that names the same encoder: the
        ensembles reuse the single towers' forwards. A tower whose encoders the config does not list (a student)
        or whose features are not dense maps alone (a kept CLS token) runs as it is."""
        from mllm.features import encoder_dense_maps, tower_features

        args = tower_config.get("init_args", {})
        configs = [args["encoder"]] if "encoder" in args else args.get("encoders")
        plan = tower.encoder_layers()
        if configs is None or plan is None or len(configs) != len(plan):
            return tower_features(tower, self.images(world), desc=desc)
        maps = []
        for config, (encoder, layers) in zip(configs, plan):
            per_layer = []
            for layer in layers or [getattr(encoder, "layer", None)]:  # the encoder's own layer, by number
                key = (json.dumps(config, sort_keys=True, default=str), layer, world)
                if key not in self._maps:
                    self._maps[key] = encoder_dense_maps(encoder, self.images(world), layer, desc=desc)
                per_layer.append(self._maps[key])
            maps.append(per_layer)
        with torch.inference_mode():
            return [part.float() for part in tower.features_from_maps(maps)]

    def untrained_paths(self, variant: Variant) -> dict[int, str]:
        """Cache files of the probe control `untrained_<variant>`: the single tower's config with every weight
        re-initialised (mllm/study/reinit.py, seed `probe_controls.seed`)."""
        from mllm.features import tower_features
        from mllm.study.reinit import reinit_weights

        seed = self.study.probe_controls.seed
        tower_config = variant_tower(variant, self.study, None)
        config = {"untrained": tower_config, "seed": seed}
        built = []

        def make(world: int, n: int) -> torch.Tensor:
            if not built:
                built.append(build_tower(tower_config))
                reinit_weights(built[0], seed)
            return tower_features(built[0], self.images(world), desc=f"untrained_{variant.name} features")
        return self._cache(f"untrained_{variant.name}", config, make)

    def pixel_paths(self) -> dict[int, str]:
        """Cache files of the probe control `pixels`: each grid cell's raw pixels (mllm.features.pixel_tokens)."""
        from mllm.features import pixel_tokens

        grid = self.study.grid or 8
        return self._cache("pixels", {"control": "pixels", "grid": grid},
                           lambda world, n: pixel_tokens(self.images(world), grid))

    def _cache(self, name: str, config: dict, make) -> dict[int, str]:
        """{world seed: cache file} of `make(world, count)` tokens for the training and held-out images."""
        from distill.toy.world import HELDOUT_SEED, TRAIN_SEED
        from mllm.features import cache_features

        out = {}
        for world, count in ((TRAIN_SEED, self.budget.train_images), (HELDOUT_SEED, self.budget.eval_images)):
            out[world] = str(cache_features(lambda: make(world, count), name, config, world, count,
                                            self.study.image_size, self.folder, self.study.max_objects))
        return out


def features_config(tower_config: dict, tower) -> dict:
    """What a tower's cached features depend on: its config without the fusion's own settings and the norm (both
    applied after the cache), but with the layers and grids the fusion asks the encoders for, so the cache key
    changes only when the cached features do."""
    import copy

    config = copy.deepcopy(tower_config)
    args = config.get("init_args", {})
    args.pop("norm", None)
    if "fusion" in args:
        fusion = tower.fusion
        args["fusion"] = {"layers": fusion.layers, "input_sizes": fusion.input_sizes(args.get("grid"), [(-1, -1)] * len(tower.dims))}
    return config


def probe_variant(paths: dict[int, str], study: Study, budget: Budget, objects: dict[int, list]) -> dict[str, float]:
    """Ridge-probe accuracies of a variant's cached tokens (mllm/study/probes.py)."""
    from distill.toy.world import HELDOUT_SEED, TRAIN_SEED
    from mllm.features import features_info, grid_tokens, load_features
    from mllm.study.probes import probe_accuracies

    grid = study.grid or 8
    train, test = (grid_tokens(load_features(paths[world], world, study.image_size, count, study.max_objects),
                               features_info(paths[world])["parts"], grid)
                   for world, count in ((TRAIN_SEED, budget.probe_images), (HELDOUT_SEED, budget.eval_images)))
    return probe_accuracies(train, objects[TRAIN_SEED], test, objects[HELDOUT_SEED], grid)


def questions(study: Study, budget: Budget) -> list[dict]:
    """The held-out questions every run answers (question, answer, kind, image id), in scoring order."""
    from distill.toy.world import HELDOUT_SEED
    from mllm.data import ToySource

    source = ToySource(seed=HELDOUT_SEED, num_images=budget.eval_images, stage="finetune", image_size=study.image_size,
                       max_objects=study.max_objects)
    return [{"question": i.question, "answer": i.answer, "kind": i.kind, "image": i.image_id} for i in source.eval_items()]


def text_prior(study: Study, budget: Budget, items: list[dict]) -> list[int]:
    """Correctness of the best image-blind answerer: the most frequent training answer for each question text
    (over every question of the training images)."""
    from collections import Counter, defaultdict

    from distill.toy.world import TRAIN_SEED, ToyWorld

    world = ToyWorld(seed=TRAIN_SEED, image_size=study.image_size, max_objects=study.max_objects)
    answers: dict[str, Counter] = defaultdict(Counter)
    for index in range(budget.probe_images):
        for qa in world.describe(index).qa:  # the same questions as world[index], nothing drawn
            answers[qa.question][qa.answer] += 1
    best = {text: counts.most_common(1)[0][0] for text, counts in answers.items()}
    return [int(best.get(i["question"]) == i["answer"]) for i in items]
