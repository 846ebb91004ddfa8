"""Entry point: `python -m distill {fit,validate,export} ...` (see distill/cli.py)."""

from distill.cli import main

if __name__ == "__main__":
    main()
