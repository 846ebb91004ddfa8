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


TAR_RESERVE = 768  # bytes a .tgt member costs beyond its data: the 512-byte header + 256 of padding on average


def teacher_bytes(summary_dim: int | None, tokens: int, bytes_per_token: int) -> int:
    """Bytes one view of one teacher takes in a `.tgt` member (`bytes_per_token`: the codec's codes + scales)."""
    return 2 * (summary_dim or 0) + tokens * bytes_per_token


def pack(parts: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]) -> bytes:
    """Concatenate (summary or None, codes [T, code_bytes], scales fp16 [T] or [T, G]) of every view x teacher, in order."""
    out = io.BytesIO()
    for summary, q, scale in parts:
        if summary is not None:
            out.write(summary.to(torch.float16).contiguous().numpy().tobytes())
        out.write(q.contiguous().numpy().tobytes())
        out.write(scale.to(torch.float16).contiguous().numpy().tobytes())
    return out.getvalue()


def unpack_view(data: bytes, view: int, teachers: list[dict], codecs: dict[str, PcaCodec]) -> dict[str, dict]:
    """Decode one view of a `.tgt` member: {teacher: {"summary": [C] (if any), "dense": [C, h, w]}} (float32).

    `teachers` is meta.json's list of {name, summary_dim, grid: [h, w], ...}; the code layout is the codec's."""
    sizes = [teacher_bytes(t["summary_dim"], t["grid"][0] * t["grid"][1], codecs[t["name"]].bytes_per_token())
             for t in teachers]
    offset = view * sum(sizes)
    if len(data) < offset + sum(sizes):
        raise ValueError(f"cached targets have {len(data)} bytes, too few for view {view} of {len(teachers)} teachers "
                         f"({sum(sizes)} bytes per view); the cache is damaged or from another layout, rebuild it.")
    out = {}
    for t in teachers:
        h, w = t["grid"]
        codec = codecs[t["name"]]
        tokens, k, groups = h * w, codec.code_bytes, len(codec.groups)
        item = {}
        if t["summary_dim"]:
            n = 2 * t["summary_dim"]
            item["summary"] = torch.from_numpy(np.frombuffer(data, np.float16, t["summary_dim"], offset).astype(np.float32))
            offset += n
        q = torch.from_numpy(np.frombuffer(data, np.uint8, tokens * k, offset).reshape(tokens, k).copy())
        offset += tokens * k
        scale = torch.from_numpy(np.frombuffer(data, np.float16, tokens * groups, offset).reshape(tokens, groups).copy())
        offset += 2 * tokens * groups
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
