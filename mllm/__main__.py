"""Entry point: `python -m mllm fit|validate -c X.yaml` or `python -m mllm evaluate --ckpt X` (see mllm/cli.py)."""

from mllm.cli import main

if __name__ == "__main__":
    main()
