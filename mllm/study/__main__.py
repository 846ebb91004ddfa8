"""`python -m mllm.study ...`: the same as `unitower study ...` (see mllm/study/cli.py)."""

from mllm.study.cli import main

if __name__ == "__main__":
    main()
