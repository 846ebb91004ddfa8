"""Byte layout of one cached sample's targets (`<key>.tgt` member) and the Theia layout it is compared with.

For every view (in order), for every teacher (in the cache's order): the summary as fp16 [C_summary]
(teachers with a summary), the dense PCA codes ([h*w, k] int8, or [h*w, k/2] uint8 for 4 bits), their per-token scales fp16 [h*w].
Shapes are fixed per teacher and recorded in `meta.json`, so the member is a plain byte string.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from safetensors.torch import save

from distill.cache.codec import PcaCodec


def teacher_bytes(summary_dim: int | None, tokens: int, components: int, bits: int = 8) -> int:
    """Bytes one view of one teacher takes in a `.tgt` member."""
    return 2 * (summary_dim or 0) + tokens * (components * bits // 8 + 2)


def pack(parts: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]) -> bytes:
    """Concatenate (summary or None, q int8 [T, k], scale fp16 [T]) of every view x teacher, in order."""
    out = io.BytesIO()
    for summary, q, scale in parts:
        if summary is not None:
            out.write(summary.to(torch.float16).contiguous().numpy().tobytes())
        out.write(q.contiguous().numpy().tobytes())
        out.write(scale.to(torch.float16).contiguous().numpy().tobytes())
    return out.getvalue()


def unpack_view(data: bytes, view: int, teachers: list[dict], codecs: dict[str, PcaCodec]) -> dict[str, dict]:
    """Decode one view of a `.tgt` member: {teacher: {"summary": [C] (if any), "dense": [C, h, w]}} (float32).

    `teachers` is meta.json's list of {name, summary_dim, grid: [h, w], components, bits}."""
    sizes = [teacher_bytes(t["summary_dim"], t["grid"][0] * t["grid"][1], t["components"], t["bits"]) for t in teachers]
    offset = view * sum(sizes)
    if len(data) < offset + sum(sizes):
        raise ValueError(f"cached targets have {len(data)} bytes, too few for view {view} of {len(teachers)} teachers "
                         f"({sum(sizes)} bytes per view); the cache is damaged or from another layout, rebuild it.")
    out = {}
    for t in teachers:
        h, w = t["grid"]
        tokens, k = h * w, t["components"] * t["bits"] // 8
        item = {}
        if t["summary_dim"]:
            n = 2 * t["summary_dim"]
            item["summary"] = torch.from_numpy(np.frombuffer(data, np.float16, t["summary_dim"], offset).astype(np.float32))
            offset += n
        dtype = np.int8 if t["bits"] == 8 else np.uint8
        q = torch.from_numpy(np.frombuffer(data, dtype, tokens * k, offset).reshape(tokens, k).copy())
        offset += tokens * k
        scale = torch.from_numpy(np.frombuffer(data, np.float16, tokens, offset).copy())
        offset += 2 * tokens
        dense = codecs[t["name"]].decode(q, scale)  # [h*w, C]
        item["dense"] = dense.T.reshape(-1, h, w).contiguous()
        out[t["name"]] = item
    return out


def theia_bytes(summary: torch.Tensor | None, dense: torch.Tensor) -> int:
    """Bytes of Theia's per-sample layout for one image of one teacher: a safetensors file of the full
    outputs in bf16 (summary [C] and dense tokens [h*w, C])."""
    tensors = {"dense": dense.reshape(dense.shape[0], -1).T.contiguous().to(torch.bfloat16)}
    if summary is not None:
        tensors["summary"] = summary.contiguous().to(torch.bfloat16)
    return len(save(tensors))


def tar_member_bytes(size: int) -> int:
    """On-disk bytes of a tar member of `size` bytes (512-byte header + data padded to 512)."""
    return 512 + -(-size // 512) * 512
