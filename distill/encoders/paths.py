"""Resolve checkpoint / model-dir strings used by the encoder wrappers.

"toy:NAME" strings point at the toy world's tiny teachers: `distill.toy.cache.toy_path(NAME)` returns
a folder (clip, dino; loaded as 'local-dir:<folder>') or a .pth file (sam). Everything else passes through.

    resolve_path("toy:sam")        -> "/.../sam.pth"
    resolve_model_name("toy:clip") -> "local-dir:/.../clip"
"""

from __future__ import annotations

from pathlib import Path

TOY_PREFIX = "toy:"
LOCAL_DIR_PREFIX = "local-dir:"


def resolve_path(spec: str | None) -> str | None:
    """Return `spec` with a leading "toy:NAME" replaced by the toy world's path for NAME."""
    if spec is None or not spec.startswith(TOY_PREFIX):
        return spec
    from distill.toy.cache import toy_path  # lazy: the toy world is only needed for toy: strings

    return str(toy_path(spec[len(TOY_PREFIX):]))


def resolve_model_name(name: str) -> str:
    """Return a model name the library understands; "toy:NAME" becomes "local-dir:<toy folder>"."""
    if name.startswith(TOY_PREFIX):
        return LOCAL_DIR_PREFIX + str(resolve_path(name))
    return name


def require_file(path: str, what: str) -> Path:
    """Return `path` as a Path, or raise FileNotFoundError naming `what` and how to fix it."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"{what}: checkpoint file '{path}' does not exist. Pass the path of a local weight file "
            "(no downloads happen here), or a 'toy:NAME' string for the toy world's teachers."
        )
    return file


def require_dir(path: str, what: str) -> Path:
    """Return `path` as a Path, or raise FileNotFoundError naming `what` and how to fix it."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what}: model folder '{path}' does not exist. A 'local-dir:' folder must hold the "
            "library's config JSON and weight file."
        )
    return folder


def load_state_dict(path: str, what: str) -> dict:
    """Read a third-party .pt/.pth/.bin/.safetensors weight file as a plain state dict through the project's
    one safe loader (`distill.io.load_weights`: weights_only=True always, clear missing/unsafe/corrupt errors)."""
    from distill.io import load_weights

    return load_weights(path, what)


def describe_key_mismatch(missing: list[str], unexpected: list[str], path: str, what: str) -> str:
    """One error message naming a few missing / unexpected keys of a checkpoint."""
    return (
        f"{what}: checkpoint '{path}' does not fit the architecture: {len(missing)} missing keys "
        f"(e.g. {missing[:5]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:5]}). "
        "Check that the model name / variant matches the checkpoint."
    )
