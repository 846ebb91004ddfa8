"""`python -m distill.toy build|report|export ...`: the same as `unitower toy ...` (see distill/toy/cli.py)."""

from distill.toy.cli import main

if __name__ == "__main__":
    main()
