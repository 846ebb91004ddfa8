"""Checks of the local files and folders the encoder wrappers are given, with errors that say what to do.

Names ('toy:NAME', 'local-dir:DIR', 'hf-hub:...') are resolved by `distill.common.names`; weight files are read by
`distill.common.io.load_weights`; state dicts are compared by `distill.common.state_dicts`.
"""

from __future__ import annotations

from pathlib import Path


def require_dir(path: str, what: str) -> Path:
    """Return `path` as a Path, or raise FileNotFoundError naming `what` and how to fix it."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what}: model folder '{path}' does not exist. A 'local-dir:' folder must hold the "
            "library's config JSON and weight file."
        )
    return folder
