"""The layout of DistillModule state dicts across versions (no Lightning, no model code).

    upgrade_state_dict(checkpoint["state_dict"])   # in place: older key names -> current ones
"""

from __future__ import annotations


def upgrade_state_dict(state: dict) -> dict:
    """Bring an older DistillModule state dict (in place) to the current layout: heads moved from 'heads.<t>.*'
    to 'student.heads.<t>.*', normalizers from 'dense_norm.<t>.*' to 'student.heads.<t>.norm.*'; the running
    EMA statistics of even older checkpoints ('stats.*') are dropped (an mse run recalibrates)."""
    for key in list(state):
        if key.startswith("heads."):
            state["student." + key] = state.pop(key)
        elif key.startswith("dense_norm."):
            teacher, rest = key.removeprefix("dense_norm.").split(".", 1)
            state[f"student.heads.{teacher}.norm.{rest}"] = state.pop(key)
        elif key.startswith("stats."):
            del state[key]
    return state
