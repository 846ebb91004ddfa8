"""What each toy teacher knows, in the study's own terms, without running the study: ridge probes of its tokens.

For every toy tower (the study's configs/towers/toy_<name>.yaml) at each asked feature layer, the tokens of 4,000
training and 1,000 held-out single-object images are pooled to the study's 2x2 grid and probed per asked kind with
the study's ridge probe (mllm/study/probes.py), beside the same architecture with re-initialised weights
(mllm/study/reinit.py) and the quadrants' raw pixels. It reads a toy cache as it is (e.g. a teacher retrained in
an experiment folder), so a change to a teacher's training can be judged against the learned-skill gate's margins
in about a minute instead of a 40-minute study.

    python scripts/skill_probe.py                                   # the active toy cache, layer -2, all towers
    python scripts/skill_probe.py --cache EXP_DIR --towers dino --layers -2 -1 --out probes.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
import yaml

from distill.common.precision import cpu_info

ROOT = Path(__file__).resolve().parents[1]
TOWERS = ("clip", "dino", "sam")


def tower_config(name: str, layer: int, grid: int) -> dict:
    """The study's toy tower config for `name` with the encoder read at `layer` and `grid` x `grid` tokens."""
    config = yaml.safe_load((ROOT / "configs" / "towers" / f"toy_{name}.yaml").read_text())
    config = copy.deepcopy(config)
    config["init_args"]["encoder"]["init_args"]["layer"] = layer
    config["init_args"]["grid"] = grid
    return config


def probe_rows(towers: list[str], layers: list[int], train_images: int, eval_images: int, grid: int = 2,
               untrained: bool = True, pixels: bool = True, seed: int = 0) -> list[dict]:
    """One row per probed token set: {"name", "layer", "seconds", and an accuracy per asked kind + "overall"}."""
    from distill.toy.world import HELDOUT_SEED, TRAIN_SEED
    from mllm.features import pixel_tokens, toy_images, tower_features
    from mllm.study.common import build_tower
    from mllm.study.probes import object_labels, probe_accuracies
    from mllm.study.reinit import reinit_weights

    images = {TRAIN_SEED: toy_images(TRAIN_SEED, train_images, 64, 1), HELDOUT_SEED: toy_images(HELDOUT_SEED, eval_images, 64, 1)}
    objects = {world: object_labels(world, len(batch), 64, 1) for world, batch in images.items()}

    def probe(name: str, layer: int | None, tokens_of) -> dict:
        started = time.time()
        train, test = tokens_of(images[TRAIN_SEED]), tokens_of(images[HELDOUT_SEED])
        accuracy = probe_accuracies(train, objects[TRAIN_SEED], test, objects[HELDOUT_SEED], grid)
        return {"name": name, "layer": layer, **accuracy, "seconds": round(time.time() - started, 1)}

    rows = [probe("pixels", None, lambda batch: pixel_tokens(batch, grid))] if pixels else []
    for name in towers:
        for layer in layers:
            for trained in (True, False) if untrained else (True,):
                tower = build_tower(tower_config(name, layer, grid))
                if not trained:
                    reinit_weights(tower, seed)
                rows.append(probe(name if trained else f"untrained_{name}", layer,
                                  lambda batch: tower_features(tower, batch, desc=name)[0][:, -1]))
    return rows


def format_rows(rows: list[dict]) -> str:
    """A plain-text table: one line per row, an accuracy column per asked kind."""
    from distill.toy.world import QA_KINDS

    kinds = list(QA_KINDS) + ["overall"]
    lines = [f"{'tokens':<18}{'layer':>6}" + "".join(f"{k:>9}" for k in kinds) + f"{'s':>7}"]
    for row in rows:
        layer = "-" if row["layer"] is None else str(row["layer"])
        lines.append(f"{row['name']:<18}{layer:>6}" + "".join(f"{row[k]:>9.3f}" for k in kinds) + f"{row['seconds']:>7.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help="toy cache folder (default: $UNITOWER_CACHE or the default cache; built if missing)")
    parser.add_argument("--towers", nargs="+", default=list(TOWERS), choices=TOWERS)
    parser.add_argument("--layers", nargs="+", type=int, default=[-2], help="feature layers (the study reads -2)")
    parser.add_argument("--train-images", type=int, default=4000, help="probe training images (the study's probe_images)")
    parser.add_argument("--eval-images", type=int, default=1000, help="held-out images (the study's eval_images)")
    parser.add_argument("--no-untrained", action="store_true", help="skip the re-initialised towers")
    parser.add_argument("--no-pixels", action="store_true", help="skip the raw-pixel row")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.cache:
        os.environ["UNITOWER_CACHE"] = str(Path(args.cache).resolve())
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = probe_rows(args.towers, args.layers, args.train_images, args.eval_images,
                      untrained=not args.no_untrained, pixels=not args.no_pixels)
    print(f"CPU: {cpu_info()[0]}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.train_images} / {args.eval_images} single-object images, 2x2 tokens")
    print(format_rows(rows))
    if args.out:
        from distill.common.io import save_json

        save_json({"rows": rows}, Path(args.out))
    return rows


if __name__ == "__main__":
    main()
