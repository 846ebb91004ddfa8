"""Run the study: `run_study` picks the route and runs it.

Two routes: the toy study (mllm/study/toy.py: distilled students, cached frozen tokens, probes and controls
from mllm/study/instrument.py, LLaVA on cached tokens) and the real-scale study (mllm/study/online.py: a study
with `eval_json`, towers in the loop). Both use the shared pieces of mllm/study/common.py and write
results.md / results.csv / results.png / records.json through mllm/study/report.py.

    report = run_study(load_study("configs/study/toy.yaml"), budget, Path("runs/study"))
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mllm.study.common import quiet_libraries, select_variants
from mllm.study.config import Budget, Study
from mllm.study.online import online_study
from mllm.study.toy import toy_study


def run_study(study: Study, budget: Budget, out_dir: Path, smoke: bool = False, force: bool = False,
              only: list[str] | None = None) -> Path:
    """Run every (variant, seed) and write results.md / results.csv / results.png in out_dir."""
    variants = select_variants(study, only)  # before any work: a typo must not give an empty table
    os.environ["UNITOWER_TOY_PROFILE"] = budget.toy_profile
    quiet_libraries()
    started = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    if study.eval_json:
        return online_study(study, budget, out_dir, variants, smoke, force, started)
    return toy_study(study, budget, out_dir, variants, smoke, force, started)
