"""The one resolver of the names configs use for models and weight files.

    toy:NAME           the toy world's item NAME (clip, dino, sam, lm), built into the toy cache on first use
    local-dir:DIR      a library's own local folder format (open_clip, timm); passed to the library as is
    hf-hub:ORG/REPO    a Hugging Face Hub repo (online only); passed to the library as is
    anything else      a file, a folder or a library's model name; passed through

    resolve_path("toy:sam")               -> "/.../sam.pth"
    resolve_model_name("toy:clip")        -> "local-dir:/.../clip"     (what open_clip / timm understand)
    resolve_path("/models/sam_b.pth")     -> "/models/sam_b.pth"

Schemes whose names must be turned into local paths here have a provider in PROVIDERS: a plugin table of
scheme -> "module:function", imported with importlib the first time such a name is resolved. The toy world's
provider lives in `distill.toy`, which depends on the encoders, which use this resolver; naming it here instead
of importing it keeps that dependency one way (tests/test_import_direction.py checks the table only points
into the toy world). A provider takes the text after the colon and returns a local path.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"
TOY_PREFIX = "toy:"
PROVIDERS: dict[str, str] = {"toy": "distill.toy.cache:toy_path"}


def split_scheme(name: str) -> tuple[str | None, str]:
    """('toy' | 'local-dir' | 'hf-hub', rest) for a name with a known scheme, else (None, name)."""
    for prefix in (TOY_PREFIX, LOCAL_DIR_PREFIX, HF_HUB_PREFIX):
        if name.startswith(prefix):
            return prefix[:-1], name[len(prefix):]
    return None, name


def provider(scheme: str) -> Callable[[str], Path]:
    """The function that resolves `scheme:` names, looked up in PROVIDERS (its module is imported on first use)."""
    module, _, function = PROVIDERS[scheme].partition(":")
    return getattr(importlib.import_module(module), function)


def resolve_path(spec: str | None) -> str | None:
    """`spec` with a provider scheme ('toy:NAME') replaced by its local path; anything else (None too) unchanged."""
    if spec is None:
        return None
    scheme, rest = split_scheme(spec)
    if scheme not in PROVIDERS:
        return spec
    return str(provider(scheme)(rest))


def resolve_model_name(name: str) -> str:
    """A model name the library understands: 'toy:NAME' becomes 'local-dir:<toy folder>'; others unchanged."""
    scheme, _ = split_scheme(name)
    if scheme in PROVIDERS:
        return LOCAL_DIR_PREFIX + str(resolve_path(name))
    return name
