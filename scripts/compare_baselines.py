"""The baseline study, kept under its old name: the same as `unitower study ...` (see mllm/study/cli.py).

    python scripts/compare_baselines.py [--smoke] [--config configs/study/llava15.yaml] [--only clip student]
"""

from mllm.study.cli import main

if __name__ == "__main__":
    main()
