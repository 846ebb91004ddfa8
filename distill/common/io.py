"""Atomic writers for everything the project saves (safetensors weights, JSON configs) and the one safe
reader for every weight / checkpoint file it loads.

Weight files are read by `load_weights`: safetensors directly, anything else
with `torch.load(weights_only=True)` passed explicitly (so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 cannot turn
unpickling of arbitrary code back on), with errors that say whether the file is missing, an unsafe pickle
or not a checkpoint at all.

A file is written to a temporary name in the same folder (`.<name>.tmp-<pid>-<random>.tmp`) and
renamed, so a crash never leaves a half-written file behind. Written files get the normal mode for new
files (0666 minus the umask, e.g. 0644), not mkstemp's 0600. A killed writer's temp file stays behind;
`remove_stale_temps(folder)` deletes those whose process is gone (the CLIs call it when a fit starts).

    save_safetensors({"w": tensor}, "out/model.safetensors")
    save_json({"architecture": "vit_small_patch16_224"}, "out/config.json")
    write_dir("out/lm", lambda tmp: model.save_pretrained(tmp))      # a whole folder, swapped in when complete
    state = load_weights("sam_vit_b_01ec64.pth", what="SAM variant 'vit_b'")   # {name: tensor}
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file


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


def write_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_folder)` on a new sibling temp folder, then put it in place of `path` (an old folder there
    is replaced; it is removed only after the new one is complete). Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            old = path.with_name(f".{path.name}.tmp-{os.getpid()}-old.tmp")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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


class UnsafeCheckpointError(ValueError):
    """A checkpoint that only loads by running pickled code; it is refused."""


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> Any:
    """The object in a .safetensors / torch file, read without running code (weights_only=True, always).

    Raises FileNotFoundError (no such file), UnsafeCheckpointError (a pickle that needs arbitrary code, refused)
    or ValueError (not a safetensors / torch file: truncated, another format); each names `what` and the path."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"{what}: checkpoint file '{path}' does not exist. Pass the path of a local weight file "
            "(no downloads happen here), or a 'toy:NAME' string for the toy world's teachers."
        )
    if file.suffix == ".safetensors":
        try:
            return load_file(str(file))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{what}: '{path}' is not a readable safetensors file ({error}).") from None
    try:
        return torch.load(str(file), map_location="cpu", weights_only=True)  # explicit: env vars cannot override
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise ValueError(f"{what}: '{path}' is not a torch checkpoint ({error}).") from None
        detail = str(error).split("\n\n")[1] if "\n\n" in str(error) else str(error)
        raise UnsafeCheckpointError(
            f"{what}: '{path}' was refused because loading it would run pickled code ({detail.strip()[:300]}). "
            "Only tensors and plain containers are read. If you trust the file, re-save its state dict "
            "(torch.save(model.state_dict(), ...) or safetensors) and load that."
        ) from None
    except Exception as error:  # zip / legacy-pickle readers raise RuntimeError, EOFError, KeyError, ...
        raise ValueError(f"{what}: '{path}' is not a readable torch checkpoint (truncated or another format: "
                         f"{type(error).__name__}: {error}).") from None


def load_weights(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A state dict {name: tensor} from a weight file (see `load_checkpoint` for the safety rule and errors);
    training checkpoints that wrap the weights one level down ('state_dict', 'model') are unwrapped."""
    state = load_checkpoint(path, what)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{what}: '{path}' holds a {type(state).__name__}, expected a state dict of tensors.")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{what}: '{path}' is not a state dict of tensors (e.g. {not_tensors[:3]} are not tensors).")
    return state


def weight_keys(path: str | Path) -> set[str]:
    """Top-level keys of a weight file without reading its tensors (memory-mapped; a 'state_dict' wrapper is
    looked into); empty when the file cannot be read this way (legacy or foreign formats)."""
    try:
        if str(path).endswith(".safetensors"):
            with safe_open(str(path), framework="pt") as f:
                return set(f.keys())
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # only a hint is lost; readers that need the weights raise their own errors
        return set()
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return set(state) if isinstance(state, dict) else set()
