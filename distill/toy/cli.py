"""Command line of the toy world (`unitower toy ...`, or `python -m distill.toy ...`).

    unitower toy build  [--cache DIR] [--force]   # train the toy teachers + LM into the cache
    unitower toy report [--cache DIR]             # skill table of the teachers, trained vs untrained
    unitower toy export OUT_DIR [--count N] [--seed S] [--shard-size K]   # webdataset shards + LLaVA JSON

The cache defaults to $UNITOWER_CACHE, else ~/.cache/unitower/toyworld.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from distill.toy.cache import TOY_FILES, ensure_cache
from distill.toy.shards import export_llava_json, export_shards
from distill.toy.skills import format_report, skill_report
from distill.toy.world import HELDOUT_SEED, TRAIN_SEED, ToyWorld


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="unitower toy", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build (or reuse) the toy teacher cache")
    build.add_argument("--cache", default=None, help="cache folder (default $UNITOWER_CACHE or ~/.cache/unitower/toyworld)")
    build.add_argument("--force", action="store_true", help="rebuild even if the cache is up to date")
    build.add_argument("--profile", default=None, help="build profile: default, or smoke (a few steps per teacher)")
    report = commands.add_parser("report", help="print the skill table (builds the cache first if needed)")
    report.add_argument("--cache", default=None, help="cache folder")
    export = commands.add_parser("export", help="write toy samples as webdataset shards and LLaVA JSON")
    export.add_argument("out_dir", help="output folder")
    export.add_argument("--count", type=int, default=1000, help="number of samples")
    export.add_argument("--seed", type=int, default=0, help=f"world seed ({TRAIN_SEED} train, {HELDOUT_SEED} held-out)")
    export.add_argument("--shard-size", type=int, default=500, help="samples per tar shard")
    args = parser.parse_args(argv)

    if args.command == "build":
        if args.profile:
            os.environ["UNITOWER_TOY_PROFILE"] = args.profile

        start = time.time()
        folder = ensure_cache(args.cache, force=args.force)
        print(f"toy cache ready at {folder} ({time.time() - start:.1f} s)")
        print((folder / "manifest.json").read_text())
    elif args.command == "report":
        folder = ensure_cache(args.cache)
        report = skill_report({name: folder / TOY_FILES[name] for name in ("clip", "dino", "sam")})
        print(format_report(report))
        print(json.dumps(report, indent=2))
    elif args.command == "export":
        world = ToyWorld(seed=args.seed)
        shards = export_shards(world, args.out_dir, args.count, args.shard_size)
        json_file = export_llava_json(world, args.out_dir, args.count)
        print(f"wrote {len(shards)} shards and {json_file}")
