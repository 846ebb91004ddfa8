"""`python -m mllm fit|validate|evaluate|export ...`: the same as `unitower llava ...` (see mllm/cli.py)."""

from mllm.cli import main

if __name__ == "__main__":
    main()
