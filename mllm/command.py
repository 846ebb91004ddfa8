"""`unitower`: one command for the whole project ([project.scripts] in pyproject.toml).

    unitower distill fit|validate|export|cache ...   distillation (distill/cli.py; also `python -m distill`)
    unitower toy build|report|export ...             the toy world (distill/toy/cli.py; also `python -m distill.toy`)
    unitower llava fit|validate|evaluate|export ...  LLaVA stages (mllm/cli.py; also `python -m mllm`)
    unitower study [--smoke] [--config ...] ...      the baseline study (mllm/study/cli.py; also `python -m mllm.study`)
    unitower recipes                                 the shipped YAML recipes (mllm/recipes.py)
    unitower --debug COMMAND ...                     keep the Python traceback of an error (`--debug` may stand anywhere)
    unitower --threads N COMMAND ...                 torch intra-op threads (torch.set_num_threads); before COMMAND.
                                                     UNITOWER_THREADS=N does the same; the flag wins. Default: torch's
                                                     (all cores), which on a shared machine can more than double a step

Everything after the subcommand goes unchanged to that part's own command line, so `unitower distill fit --help`
is `python -m distill fit --help`, with two exceptions that make `unitower` behave like a tool run from any folder:

- a relative `*.yaml` argument that names no file in the cwd but a shipped recipe (`configs/distill/toy.yaml`)
  is replaced by the shipped file's path (mllm/recipes.py `shipped_config`; a note on stderr says so);
- a user error (USER_ERRORS: a missing file, a bad value, an unreadable YAML, a missing optional package) ends
  in one line on stderr, `unitower COMMAND: error: <what, where, what to do> (--debug shows the traceback)`, and
  exit code 1. Any other exception is a programming error and keeps its traceback.

The parts are imported only when called: `unitower --help` stays quick.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import yaml

from mllm.recipes import shipped_config

# name -> (module with a `main(argv)` function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "distill": ("distill.cli", "distill teachers into one student: fit | validate | export | cache (LightningCLI)"),
    "toy": ("distill.toy.cli", "the toy world: build the tiny teachers + LM | report their skills | export samples"),
    "llava": ("mllm.cli", "LLaVA with a pluggable vision tower: fit | validate | evaluate | export"),
    "study": ("mllm.study.cli", "the baseline study: every tower as a LLaVA vision tower, results table and plot"),
    "recipes": ("mllm.recipes", "list the shipped YAML recipes (usable as configs/... from any folder)"),
}

DEBUG_FLAG = "--debug"
THREADS_FLAG, THREADS_ENV = "--threads", "UNITOWER_THREADS"
EXIT_USER_ERROR = 1
# What a user can cause and fix from the message alone. The project's own checks raise these with a message that
# names the thing and what to do (FileNotFoundError for paths, ValueError for config values); argparse.ArgumentError
# is jsonargparse's (exit_on_error=False parsers); ModuleNotFoundError is a missing optional extra. KeyError,
# TypeError, RuntimeError, ... stay tracebacks: from our code they are bugs, and torch's need their context.
USER_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
    ValueError, argparse.ArgumentError, yaml.YAMLError, ModuleNotFoundError,
)


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: unitower [--debug] COMMAND [ARGS ...]   (`unitower COMMAND --help` for a command's own options)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", f"{THREADS_FLAG} N (before COMMAND) or {THREADS_ENV}=N: torch threads (torch.set_num_threads).",
              "Config paths (e.g. configs/distill/toy.yaml) are read from the current folder first, then from the",
              f"shipped recipes (`unitower recipes`). Errors print one line; {DEBUG_FLAG} keeps the traceback."]
    return "\n".join(lines)


def with_shipped_recipes(argv: list[str]) -> list[str]:
    """`argv` with every relative *.yaml path that is no file in the cwd but a shipped recipe replaced by the
    shipped file (`--key=path` too); a note on stderr names each replacement."""
    out = []
    for arg in argv:
        prefix, _, value = arg.rpartition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
        shipped = None
        if value.endswith((".yaml", ".yml")) and not Path(value).is_absolute() and not Path(value).exists():
            shipped = shipped_config(value)
        if shipped is None:
            out.append(arg)
            continue
        print(f"unitower: {value} is not in {Path.cwd()}; using the shipped recipe {shipped}", file=sys.stderr)
        out.append(f"{prefix}={shipped}" if prefix else str(shipped))
    return out


def take_threads(argv: list[str]) -> tuple[list[str], int | None]:
    """(argv without a leading `--threads N` / `--threads=N`, N); N falls back to $UNITOWER_THREADS, else None."""
    value, rest = os.environ.get(THREADS_ENV) or None, list(argv)
    source = f"${THREADS_ENV}"
    if rest and rest[0].startswith(THREADS_FLAG + "="):
        value, rest, source = rest[0].split("=", 1)[1], rest[1:], THREADS_FLAG
    elif rest and rest[0] == THREADS_FLAG:
        if len(rest) < 2:
            raise SystemExit(f"unitower: {THREADS_FLAG} needs a number of threads, e.g. `unitower {THREADS_FLAG} 4 llava fit ...`")
        value, rest, source = rest[1], rest[2:], THREADS_FLAG
    if value is None:
        return rest, None
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"unitower: {source}={value!r} is not a number of threads >= 1; e.g. {THREADS_FLAG} 4.")
    return rest, int(value)


def one_line(error: BaseException) -> str:
    """The error's message on one line (whitespace runs, newlines included, become one space)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def main(argv: list[str] | None = None) -> None:
    """Run `unitower [--debug] COMMAND ARGS...`: hand ARGS to COMMAND's `main` (see the module docstring for the
    recipe paths and the one-line errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = DEBUG_FLAG in argv
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    argv, threads = take_threads(argv)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        if not argv:
            raise SystemExit(2)
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unitower: unknown command '{name}'; use one of: {', '.join(COMMANDS)}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    if debug:
        importlib.import_module(COMMANDS[name][0]).main(with_shipped_recipes(rest))
        return
    try:
        importlib.import_module(COMMANDS[name][0]).main(with_shipped_recipes(rest))
    except USER_ERRORS as error:
        print(f"unitower {name}: error: {one_line(error)} ({DEBUG_FLAG} shows the traceback)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        print(f"unitower {name}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
