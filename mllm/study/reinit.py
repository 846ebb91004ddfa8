"""Re-initialise every weight of a module, deterministically: the "untrained" control of the study's probes
(the same architecture and shapes, none of the training).

    tower = build_tower(config)
    reinit_weights(tower, seed=0)   # in place; returns the names of the parameters drawn from normal(0, 0.02)

Every submodule with a `reset_parameters()` (Linear, Conv, LayerNorm, ...) resets its own parameters with
torch's default initialisation; a norm layer without one (e.g. segment_anything's LayerNorm2d) goes back to
weight 1, bias 0; every remaining parameter (position embeddings, class tokens, registers, layer scales) is
drawn from normal(0, 0.02). The global RNG state is left as it was.
"""

from __future__ import annotations

import torch
from torch import nn

STD = 0.02


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


@torch.no_grad()
def reinit_weights(module: nn.Module, seed: int) -> list[str]:
    """Re-initialise every parameter of `module` in place (see the module docstring); returns the names of the
    parameters that no reset_parameters() or norm rule covered and were drawn from normal(0, 0.02)."""
    covered: set[int] = set()
    drawn = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for sub in module.modules():
            own = dict(sub.named_parameters(recurse=False))
            if callable(getattr(sub, "reset_parameters", None)):
                sub.reset_parameters()
                covered |= {id(p) for p in own.values()}
            elif _is_norm(sub) and own:
                for name, param in own.items():
                    param.fill_(1.0 if name == "weight" else 0.0)
                    covered.add(id(param))
        for name, param in module.named_parameters():
            if id(param) not in covered:
                param.normal_(0.0, STD)
                drawn.append(name)
    return drawn
