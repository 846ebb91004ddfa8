"""Export toy-world samples to webdataset tar shards and to LLaVA conversation JSON.

Shards (`000000.tar`, ...): per sample `__key__` (zero-padded index), `png` (the image), `json`
(caption, objects, question/answer pairs) and `masks.npy` (bool [N, H, W]).
LLaVA JSON: `llava.json` = [{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}] with the images written to `images/<key>.png`; the first turn
asks for a caption, the others are the sample's questions.

    python -m distill.toy export OUT_DIR --count 1000 --seed 0
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import webdataset as wds

from distill.common.io import atomic_write
from distill.toy.world import ToySample, ToyWorld

CAPTION_PROMPT = "describe the image."


def sample_record(sample: ToySample) -> dict:
    """JSON-serializable metadata of a sample (everything but the pixels and masks)."""
    return {
        "index": sample.index,
        "caption": sample.caption,
        "objects": [asdict(o) for o in sample.objects],
        "qa": [asdict(q) for q in sample.qa],
    }


def sample_conversation(sample: ToySample, image: str) -> dict:
    """One LLaVA conversation record: a caption turn followed by every question of the sample."""
    return conversation_from_record(sample_record(sample), image)


def conversation_from_record(record: dict, image: str) -> dict:
    """The LLaVA conversation record of a shard's `json` member (`sample_record` output), as in llava.json."""
    turns = [(CAPTION_PROMPT, record["caption"])] + [(q["question"], q["answer"]) for q in record["qa"]]
    conversations = []
    for i, (question, answer) in enumerate(turns):
        conversations.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": f"{record['index']:08d}", "image": image, "conversations": conversations}


def export_shards(world: ToyWorld, out_dir: str | Path, count: int, shard_size: int = 500) -> list[Path]:
    """Write the first `count` samples of `world` as webdataset shards in `out_dir`; return the shard paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for index in range(count):
            sample = world[index]
            sink.write({
                "__key__": f"{index:08d}",
                "png": sample.image,
                "json": sample_record(sample),
                "masks.npy": sample.masks,
            })
    return sorted(out.glob("*.tar"))


def export_llava_json(world: ToyWorld, out_dir: str | Path, count: int) -> Path:
    """Write images/<key>.png and llava.json (image paths relative to `out_dir`) for the first `count` samples."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        sample = world[index]
        image = f"images/{index:08d}.png"
        sample.image.save(out / image)
        records.append(sample_conversation(sample, image))
    atomic_write(out / "llava.json", lambda tmp: Path(tmp).write_text(json.dumps(records)))
    return out / "llava.json"
