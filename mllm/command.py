"""`unitower`: one command for the whole project ([project.scripts] in pyproject.toml).

    unitower distill fit|validate|export|cache ...   distillation (distill/cli.py; also `python -m distill`)
    unitower toy build|report|export ...             the toy world (distill/toy/cli.py; also `python -m distill.toy`)
    unitower llava fit|validate|evaluate|export ...  LLaVA stages (mllm/cli.py; also `python -m mllm`)
    unitower study [--smoke] [--config ...] ...      the baseline study (mllm/study/cli.py; also `python -m mllm.study`)

Everything after the subcommand goes unchanged to that part's own command line, so `unitower distill fit --help`
is `python -m distill fit --help`. The parts are imported only when called: `unitower --help` stays quick.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module with a `main(argv)` function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "distill": ("distill.cli", "distill teachers into one student: fit | validate | export | cache (LightningCLI)"),
    "toy": ("distill.toy.cli", "the toy world: build the tiny teachers + LM | report their skills | export samples"),
    "llava": ("mllm.cli", "LLaVA with a pluggable vision tower: fit | validate | evaluate | export"),
    "study": ("mllm.study.cli", "the baseline study: every tower as a LLaVA vision tower, results table and plot"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: unitower COMMAND [ARGS ...]   (`unitower COMMAND --help` for a command's own options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run `unitower COMMAND ARGS...`: hand ARGS to COMMAND's `main`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        if not argv:
            raise SystemExit(2)
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unitower: unknown command '{name}'; use one of: {', '.join(COMMANDS)}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module(COMMANDS[name][0]).main(rest)


if __name__ == "__main__":
    main()
