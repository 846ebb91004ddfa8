"""The one comparison of a state dict with the one a model expects, and the error that names what differs.

    missing, unexpected, misshapen = key_differences(model.state_dict(), state)
    check_state_dict(model.state_dict(), state, path, what="SAM variant 'tiny'")   # ValueError naming keys
    model.load_state_dict(state)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch


class KeyDifferences(NamedTuple):
    """Keys the model needs but the state lacks, keys it does not know, and keys whose shapes differ."""

    missing: list[str]
    unexpected: list[str]
    misshapen: list[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshapen)


def key_differences(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                    ignore: Iterable[str] = ()) -> KeyDifferences:
    """Compare `state` with `expected` (a model's state_dict()); keys in `ignore` are left out of both sides.
    `misshapen` entries read 'key: (state shape) vs (expected shape)'."""
    ignored = set(ignore)
    missing = [k for k in expected if k not in state and k not in ignored]
    unexpected = [k for k in state if k not in expected and k not in ignored]
    misshapen = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and k not in ignored and state[k].shape != v.shape]
    return KeyDifferences(missing, unexpected, misshapen)


def describe_key_mismatch(missing: list[str], unexpected: list[str], path: str, what: str) -> str:
    """One error message naming a few missing / unexpected keys of a checkpoint."""
    return (
        f"{what}: checkpoint '{path}' does not fit the architecture: {len(missing)} missing keys "
        f"(e.g. {missing[:5]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:5]}). "
        "Check that the model name / variant matches the checkpoint."
    )


def check_state_dict(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], path: str, what: str,
                     ignore: Iterable[str] = ()) -> None:
    """Raise ValueError naming missing / unexpected keys (first) or misshapen tensors unless `state` fits `expected`."""
    differences = key_differences(expected, state, ignore)
    if differences.missing or differences.unexpected:
        raise ValueError(describe_key_mismatch(differences.missing, differences.unexpected, path, what))
    if differences.misshapen:
        raise ValueError(
            f"{what}: checkpoint '{path}' has tensors of the wrong shape (checkpoint vs model), e.g. "
            f"{differences.misshapen[:5]}. Check that the variant matches the checkpoint."
        )
