"""Atomic writers for everything the project saves: safetensors weights and JSON configs.

A file is written to a temporary name in the same folder (`.<name>.tmp-<pid>-<random>.tmp`) and
renamed, so a crash never leaves a half-written file behind. Written files get the normal mode for new
files (0666 minus the umask, e.g. 0644), not mkstemp's 0600. A killed writer's temp file stays behind;
`remove_stale_temps(folder)` deletes those whose process is gone (the CLIs call it when a fit starts).

    save_safetensors({"w": tensor}, "out/model.safetensors")
    save_json({"architecture": "vit_small_patch16_224"}, "out/config.json")
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` then rename tmp_path to `path` (parents are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


# Leftovers of killed writers: atomic_write temp files; toy-cache build and swap folders.
_STALE_TEMP = re.compile(r"^\..+\.tmp-(\d+)-.*\.tmp$")
_STALE_BUILD = re.compile(r"^.+\.(?:building|old)-(\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | Path, build_dirs_of: str | None = None) -> list[Path]:
    """Delete atomic_write temp files in `folder` whose writing process no longer runs (and, with
    `build_dirs_of=NAME`, the toy cache's `NAME.building-PID` / `NAME.old-PID` folders); returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        match = _STALE_TEMP.match(entry.name) or (
            _STALE_BUILD.match(entry.name) if build_dirs_of and entry.name.startswith(build_dirs_of + ".") else None)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write contiguous CPU copies of `tensors` as safetensors, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_json(obj: dict, path: str | Path) -> Path:
    """Write `obj` as indented JSON, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    return atomic_write(path, write)
