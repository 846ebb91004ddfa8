"""`python -m distill fit|validate|export ...`: the same as `unitower distill ...` (see distill/cli.py)."""

from distill.cli import main

if __name__ == "__main__":
    main()
