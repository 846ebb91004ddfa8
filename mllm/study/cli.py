"""Run the baseline study: LLaVA with each single encoder, the ensembles and the distilled student.

    unitower study                          # toy study, 3 seeds (31 to 32 min on 2 CPU cores: README, Results)
    unitower study --smoke                  # 1 seed, few steps (CI)
    unitower study --config configs/study/llava15.yaml --out runs/study_llava15
    unitower study --only clip student --seeds 1 --force

`python -m mllm.study ...` and `python scripts/compare_baselines.py ...` are the same command. The study config
(and the recipes it names) is read from the cwd first, then from the shipped recipes (mllm/recipes.py), so
`unitower study` runs from any folder and writes runs/ there.

Finished runs are reused (keyed by their config); --force reruns them. Writes OUT/results.md,
results.csv, results.png and every run's config under OUT/runs/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mllm.recipes import resolve_config
from mllm.study.config import load_study, with_budget
from mllm.study.runner import run_study


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="unitower study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/study/toy.yaml",
                        help="study YAML (the cwd first, then the shipped configs/study/: `unitower recipes`)")
    parser.add_argument("--out", default=None, help="output folder (default runs/study or runs/study_smoke)")
    parser.add_argument("--smoke", action="store_true", help="1 seed, few steps: checks the whole route quickly")
    parser.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    parser.add_argument("--only", nargs="+", default=None, help="run only these variants")
    parser.add_argument("--force", action="store_true", help="rerun finished runs")
    args = parser.parse_args(argv)
    study = load_study(resolve_config(args.config, "study config"))
    budget = with_budget(study, args.smoke, args.seeds)
    out = Path(args.out or ("runs/study_smoke" if args.smoke else "runs/study"))
    report = run_study(study, budget, out, smoke=args.smoke, force=args.force, only=args.only)
    print(report.read_text())
    print(f"wrote {report}, {out / 'results.csv'}, {out / 'results.png'}")
    return report
