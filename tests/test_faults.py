"""Fault injection: damaged images, shards and JSON through both data paths, with exact skip counts.

Builds truncated JPEGs, zero-byte files, text saved as .jpg, 16-bit / CMYK / palette / alpha images, a tar
with a garbage header mid-shard, a truncated tar, a missing shard, bad JSON and missing images, then reads
them through distill (ImageFolder, ShardImages + DistillDataModule) and mllm (LlavaJsonSource, WebDataSource +
LlavaDataModule) exactly as training does (DataLoader + the DataModule's on_before_batch_transfer), and checks
what was used, what was skipped, why, and that the warnings name shard + member (or file). No training.

Run: pytest tests/test_faults.py -q
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data import DistillDataModule, ImageFolder, ShardImages
from distill.common.decode import decode_image, tar_samples
from distill.common.skips import DataQualityError, DataSkips, Skipped, SkipTally
from tiny_llava import TINY_TEXTS, tiny_image, tiny_qa

GRAY16 = round(0.38 * 65535)  # a 16-bit gray level whose true brightness is 0.38


# ------------------------------------------------------------------------------------------------ builders


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def good_png(index: int = 0) -> bytes:
    return encode(tiny_image(index), "PNG")


def truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    return data[: len(data) // 2]


def gray16_png() -> bytes:
    return encode(Image.fromarray(np.full((32, 32), GRAY16, np.uint16)), "PNG")


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG")  # pure red in CMYK


def palette_png() -> bytes:
    image = Image.new("P", (32, 32), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    return encode(image, "PNG")


TEXT_AS_JPG = b"this is a text file saved with a .jpg name\n"


def conversation(index: int) -> dict:
    _, question, answer = tiny_qa(index)
    return {"id": f"s{index}", "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                 {"from": "gpt", "value": answer}]}


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> dict[str, int]:
    """Write a tar; return each member's header offset."""
    offsets = {}
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            offsets[name] = tar.offset
            tar.addfile(info, io.BytesIO(data))
    return offsets


def clean_samples(count: int) -> list[tuple[str, bytes]]:
    return [m for i in range(count) for m in ((f"{i:06d}.png", good_png(i)), (f"{i:06d}.json", json.dumps(conversation(i)).encode()))]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """000000.tar: one fault per sample; 000001.tar: 30 samples, garbage header on sample 15's png;
    000002.tar: 8 samples cut inside sample 5's png; 000003.tar: missing."""
    root = tmp_path_factory.mktemp("shards")
    j = lambda i: json.dumps(conversation(i)).encode()
    write_tar(root / "000000.tar", clean_samples(4) + [
        ("s4.jpg", truncated_jpeg()), ("s4.json", j(4)),
        ("s5.jpg", b""), ("s5.json", j(5)),
        ("s6.jpg", TEXT_AS_JPG), ("s6.json", j(6)),
        ("s7.png", gray16_png()), ("s7.json", j(7)),
        ("s8.jpg", cmyk_jpeg()), ("s8.json", j(8)),
        ("s9.png", good_png(9)), ("s9.json", b'{"id": "s9", "conversations": ['),   # bad JSON
        ("s10.json", j(10)),                                                    # no image member
        ("s11.png", good_png(11)),                                              # no json member
        ("s12.png", good_png(12)), ("s12.json", b'{"id": "s12", "text": "no conversations"}'),
    ])
    offsets = write_tar(root / "000001.tar", clean_samples(30))
    data = bytearray((root / "000001.tar").read_bytes())
    start = offsets["000015.png"]
    data[start:start + 512] = np.random.default_rng(1).integers(1, 256, 512, dtype=np.uint8).tobytes()
    (root / "000001.tar").write_bytes(bytes(data))
    offsets = write_tar(root / "000002.tar", clean_samples(8))
    full = (root / "000002.tar").read_bytes()
    (root / "000002.tar").write_bytes(full[: offsets["000005.png"] + 512 + 40])  # header + 40 bytes of its data
    return root


SHARD_URLS = "{000000..000003}.tar"


def drain(datamodule, loader) -> tuple[list, list[str]]:
    """Every batch as training sees it (after on_before_batch_transfer) and every warning message."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [datamodule.on_before_batch_transfer(batch, 0) for batch in loader]
    return batches, [str(w.message) for w in caught]


# ------------------------------------------------------------------------------------------------ decode policy


def test_decode_policy_per_mode(tmp_path):
    """16-bit gray keeps its brightness (PIL's convert would give 1.0), palette/CMYK convert, alpha goes on white."""
    gray = decode_image(gray16_png(), "gray16")
    assert gray.mode == "RGB" and abs(np.asarray(gray).mean() / 255 - 0.38) < 1 / 255
    assert np.asarray(Image.open(io.BytesIO(gray16_png())).convert("RGB")).mean() / 255 == 1.0  # the old bug
    assert np.asarray(decode_image(palette_png(), "p"))[0, 0].tolist() == [10, 200, 30]
    red = np.asarray(decode_image(cmyk_jpeg(), "cmyk"))[0, 0].astype(int)
    assert red[0] > 240 and red[1] < 15 and red[2] < 15
    rgba = Image.new("RGBA", (4, 4), (200, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    out = np.asarray(decode_image(encode(rgba, "PNG"), "rgba"))
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [0, 0, 0] and out[2, 2].tolist() == [127] * 3
    la = np.asarray(decode_image(encode(Image.new("LA", (2, 2), (0, 0)), "PNG"), "la"))
    assert la[0, 0].tolist() == [255, 255, 255]
    transparent_palette = Image.new("P", (2, 2), 1)
    transparent_palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    transparent_palette.info["transparency"] = 1
    assert np.asarray(decode_image(encode(transparent_palette, "PNG"), "pt"))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(decode_image(encode(Image.new("L", (2, 2), 77), "PNG"), "l"))[0, 0].tolist() == [77] * 3
    assert np.asarray(decode_image(encode(Image.new("1", (2, 2), 1), "PNG"), "1"))[0, 0].tolist() == [255] * 3
    tiff = tmp_path / "f.tiff"
    Image.new("F", (2, 2), 0.5).save(tiff)
    skipped = decode_image(tiff, str(tiff))
    assert isinstance(skipped, Skipped) and skipped.reason == "unsupported image mode" and "f.tiff" in skipped.message


@pytest.mark.parametrize("data, reason, detail", [
    (truncated_jpeg(), "undecodable image", "image file is truncated"),
    (b"", "empty file", "0 bytes"),
    (TEXT_AS_JPG, "undecodable image", "UnidentifiedImageError: not an image format PIL knows (starts with b'this is a text f')"),
])
def test_unusable_bytes_become_named_markers(data, reason, detail):
    marker = decode_image(data, "shard.tar :: x.jpg", "shard.tar")
    assert isinstance(marker, Skipped) and marker.reason == reason and detail in marker.detail
    assert marker.message.startswith("skipping shard.tar :: x.jpg: " + reason)


def test_truncated_image_is_caught_even_when_pil_was_told_to_accept_it(monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # lmms-eval sets this global on import
    marker = decode_image(truncated_jpeg(), "x.jpg", "x.jpg")
    assert isinstance(marker, Skipped) and marker.reason == "undecodable image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored
    assert not isinstance(decode_image(good_png(), "ok.png", "ok.png"), Skipped)


# ------------------------------------------------------------------------------------------------ tar reading


def test_garbage_header_mid_shard_keeps_the_rest(shards):
    items = list(tar_samples([str(shards / "000001.tar")]))
    markers = [x for x in items if isinstance(x, Skipped)]
    samples = [x for x in items if not isinstance(x, Skipped)]
    assert len(samples) == 30  # webdataset alone stops at the garbage header: 15 samples, no warning
    assert sum(1 for s in samples if "png" in s) == 29 and "png" not in samples[15]
    assert [m.reason for m in markers] == ["damaged tar header"]
    assert "000001.tar :: bytes" in markers[0].where and "between 000014.json and 000015.json" in markers[0].detail


def test_truncated_shard_is_reported(shards):
    items = list(tar_samples([str(shards / "000002.tar")]))
    assert [s["__key__"] for s in items if not isinstance(s, Skipped)] == [f"{i:06d}" for i in range(5)]
    (marker,) = [x for x in items if isinstance(x, Skipped)]
    assert marker.reason == "truncated shard" and marker.where.endswith("000002.tar :: 000005.png")
    assert "later members are lost" in marker.detail


@pytest.mark.parametrize("content, detail", [(b"", "0 bytes"), (b"garbage" * 200, "no valid tar header")])
def test_unreadable_shard_is_one_marker(tmp_path, content, detail):
    (tmp_path / "bad.tar").write_bytes(content)
    (marker,) = list(tar_samples([str(tmp_path / "bad.tar")]))
    assert marker.reason == "unreadable shard" and detail in marker.detail


def test_shard_cut_at_a_member_boundary_is_reported(tmp_path):
    offsets = write_tar(tmp_path / "a.tar", clean_samples(4))
    (tmp_path / "a.tar").write_bytes((tmp_path / "a.tar").read_bytes()[: offsets["000002.png"]])
    items = list(tar_samples([str(tmp_path / "a.tar")]))
    assert len([s for s in items if not isinstance(s, Skipped)]) == 2
    assert [m.reason for m in items if isinstance(m, Skipped)] == ["truncated shard"]


# ------------------------------------------------------------------------------------------------ distill path


def test_distill_image_folder_faults(tmp_path):
    files = {"good0.png": good_png(0), "good1.png": good_png(1), "truncated.jpg": truncated_jpeg(), "zero.jpg": b"",
             "text.jpg": TEXT_AS_JPG, "gray16.png": gray16_png(), "cmyk.jpg": cmyk_jpeg(), "palette.png": palette_png()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    source = ImageFolder(str(tmp_path), min_size=16)
    dm = DistillDataModule(train=source, val=source, image_size=16, batch_size=3, num_workers=0)
    batches, messages = drain(dm, dm.val_dataloader())
    images = torch.cat(batches)
    tally = dm.skips.train
    assert images.shape == (5, 3, 16, 16) and tally.used == 5
    assert tally.by_reason == {"undecodable image": 2, "empty file": 1}
    assert sum("truncated.jpg: undecodable image" in m and "image file is truncated" in m for m in messages) == 1
    assert sum("zero.jpg: empty file" in m for m in messages) == 1
    assert sum("text.jpg: undecodable image" in m for m in messages) == 1
    sorted_files = sorted(files)  # the folder is read in sorted order
    gray = images[[n for n in sorted_files if n not in ("truncated.jpg", "zero.jpg", "text.jpg")].index("gray16.png")]
    assert abs(gray.mean().item() - 0.38) < 0.01
    assert "[train] 5 items used, 3 skipped: {'undecodable image': 2, 'empty file': 1}" in dm.skips.summary()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_distill_shard_faults(shards, num_workers):
    source = ShardImages(str(shards / SHARD_URLS), resampled=False, shuffle_buffer=0, min_size=16)
    dm = DistillDataModule(train=source, val=source, image_size=16, batch_size=4, num_workers=num_workers)
    with pytest.warns(UserWarning, match=r"1 of 4 shards do not exist.*000003.tar"):
        loader = dm.val_dataloader()
    batches, messages = drain(dm, loader)
    tally = dm.skips.train
    assert sum(len(b) for b in batches) == tally.used == 43  # 9 + 29 + 5
    assert tally.by_reason == {"undecodable image": 2, "empty file": 1, "no image member": 2,
                               "damaged tar header": 1, "truncated shard": 1, "missing shard": 1}
    text = "\n".join(messages)
    assert "000000.tar :: s4.jpg: undecodable image" in text and "000000.tar :: s5.jpg: empty file" in text
    assert "000000.tar :: s10: no image member" in text and "000001.tar :: 000015: no image member" in text
    assert "000001.tar :: bytes" in text and "000002.tar :: 000005.png: truncated shard" in text
    assert "000003.tar: missing shard" in text
    assert tally.by_file.most_common(1)[0][0].endswith("000000.tar")


def test_distill_ceiling_stops_a_mostly_broken_run(tmp_path):
    for i in range(70):
        (tmp_path / f"broken{i:03d}.jpg").write_bytes(TEXT_AS_JPG)
    for i in range(30):
        (tmp_path / f"good{i:03d}.png").write_bytes(good_png(i))
    source = ImageFolder(str(tmp_path))
    dm = DistillDataModule(train=source, val=source, image_size=16, batch_size=10, num_workers=0, max_skipped_fraction=0.5)
    expected = r"70 of 100 items skipped \(70%\), more than max_skipped_fraction=0.5. Worst files: .*broken000.jpg \(1\)"
    with pytest.raises(DataQualityError, match=expected), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in dm.val_dataloader():
            dm.on_before_batch_transfer(batch, 0)
    relaxed = DistillDataModule(train=source, val=source, image_size=16, batch_size=10, num_workers=0, max_skipped_fraction=0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        drain(relaxed, relaxed.val_dataloader())
    assert relaxed.skips.train.skipped == 70 and relaxed.skips.train.used == 30


# ------------------------------------------------------------------------------------------------ mllm path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    from distill.toy.lm import build_toy_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    build_toy_tokenizer(TINY_TEXTS).save_pretrained(folder)
    return str(folder)


def llava_datamodule(source, tokenizer_dir: str, num_workers: int = 0):
    from mllm.datamodule import LlavaDataModule

    dm = LlavaDataModule(train=source, val=source, tokenizer=tokenizer_dir, max_length=128, image_size=16,
                         batch_size=4, num_workers=num_workers, num_image_tokens=4)
    dm.setup("fit")
    return dm


def test_mllm_llava_json_faults(tmp_path, tokenizer_dir):
    from mllm.data import LlavaJsonSource

    images = {"0.png": good_png(0), "1.png": good_png(1), "2.png": good_png(2), "3.png": good_png(3),
              "truncated.jpg": truncated_jpeg(), "zero.jpg": b"", "text.jpg": TEXT_AS_JPG, "gray16.png": gray16_png(),
              "cmyk.jpg": cmyk_jpeg(), "palette.png": palette_png(), "deleted.png": good_png(4)}
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    records = [dict(conversation(i), image=name) for i, name in enumerate(images)]
    records.append(dict(conversation(11), image="never_there.png"))  # dropped at load: missing image
    records.append("not a record")                                   # dropped at load: malformed
    (tmp_path / "data.json").write_text(json.dumps(records))
    with pytest.warns(UserWarning, match=r"skipped 2 of 13 records .*never_there.png"):
        source = LlavaJsonSource(str(tmp_path / "data.json"), str(tmp_path))
    os.remove(tmp_path / "deleted.png")  # disappears after the JSON was checked
    dm = llava_datamodule(source, tokenizer_dir)
    batches, messages = drain(dm, dm.val_dataloader())
    assert sum(len(b["input_ids"]) for b in batches) == dm.skips.train.used == 7
    assert dm.skips.train.by_reason == {"undecodable image": 2, "empty file": 1, "missing file": 1}
    assert dm.skips.loaded["val"].by_reason == {"missing image": 1, "malformed record": 1}
    assert dm.skips.total("train") == 6  # without a Trainer the batches count as training; load drops included
    text = "\n".join(messages)
    assert "data.json record s4 image" in text and "truncated.jpg: undecodable image" in text
    assert "zero.jpg: empty file" in text and "deleted.png: missing file" in text
    gray = source.load_image(records[7])
    assert abs(np.asarray(gray).mean() / 255 - 0.38) < 1 / 255
    items = source.eval_items()  # evaluation never drops a question silently: a broken image is an error
    with pytest.raises(ValueError, match=r"evaluation record .*data.json record 4 \(id s4\) image .*truncated.jpg: undecodable image"):
        items[4].load_image()
    (tmp_path / "bad.json").write_text('[{"id": "0", "conversations": []},\n {"id": ')
    with pytest.raises(ValueError, match=r"bad.json: malformed JSON at line 2, column 9: Expecting value"):
        LlavaJsonSource(str(tmp_path / "bad.json"), str(tmp_path))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mllm_shard_faults(shards, tokenizer_dir, num_workers):
    from mllm.data import WebDataSource

    dm = llava_datamodule(WebDataSource(str(shards / SHARD_URLS), shuffle_buffer=0), tokenizer_dir, num_workers)
    batches, messages = drain(dm, dm.val_dataloader())
    tally = dm.skips.train
    assert sum(len(b["input_ids"]) for b in batches if b["input_ids"] is not None) == tally.used == 40  # 6 + 29 + 5
    assert tally.by_reason == {"undecodable image": 2, "empty file": 1, "bad json member": 1, "no image member": 2,
                               "no json member": 1, "no conversations": 1, "damaged tar header": 1,
                               "truncated shard": 1, "missing shard": 1}
    text = "\n".join(messages)
    assert "000000.tar :: s9.json: bad json member" in text and "000000.tar :: s11: no json member" in text
    assert "000000.tar :: s12.json: no conversations (the json member has no 'conversations' list (keys: ['id', 'text'])" in text
    assert "000001.tar :: 000015: no image member" in text and "000003.tar: missing shard" in text
    images = torch.cat([b["images"] for b in batches if b["images"] is not None])
    assert images.shape == (40, 3, 16, 16)


def test_mllm_reads_toy_export_shards(tmp_path, tokenizer_dir):
    """`python -m distill.toy export` shards (json = caption + qa, no 'conversations') give the same
    conversations as the export's llava.json."""
    from distill.toy.shards import export_llava_json, export_shards
    from distill.toy.world import ToyWorld
    from mllm.data import WebDataSource

    world = ToyWorld(seed=0, image_size=32)
    export_shards(world, tmp_path / "shards", count=3)
    llava = json.loads(export_llava_json(world, tmp_path / "json", count=3).read_text())
    items = list(WebDataSource(str(tmp_path / "shards" / "000000.tar"), shuffle_buffer=0).samples(shuffle=False))
    assert len(items) == 3 and not any(isinstance(x, Skipped) for x in items)
    for (record, image, _), expected, index in zip(items, llava, range(3)):
        assert record["conversations"] == expected["conversations"] and record["id"] == expected["id"]
        assert np.array_equal(np.asarray(image), np.asarray(world[index].image))


def test_skipped_total_is_logged_as_a_running_count():
    """train/skipped is the cumulative count, logged when it changes (was re-logged: a true 2 showed as 3)."""

    class Logger:
        def __init__(self):
            self.rows = []

        def log_metrics(self, metrics, step):
            self.rows.append((step, metrics["train/skipped"]))

    class Trainer:
        training, loggers, global_step = True, [Logger()], 0

    skips, trainer = DataSkips(max_skipped_fraction=1.0), Trainer()
    marker = Skipped("a.tar :: k", "a.tar", "undecodable image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step, markers in enumerate([[], [marker], [], [], [marker], []]):
            trainer.global_step = step
            skips.record(trainer, markers, used=4 - len(markers))
    assert trainer.loggers[0].rows == [(0, 0.0), (1, 1.0), (4, 2.0)]
    assert skips.train.skipped == 2 and skips.train.used == 22
    assert "[train] 22 items used, 2 skipped: {'undecodable image': 2}; worst files: a.tar (2)" in skips.summary()


def test_tally_ceiling_needs_enough_items():
    tally = SkipTally("train", max_skipped_fraction=0.1)
    tally.add([Skipped(f"f{i}", f"f{i}", "undecodable image") for i in range(50)], used=49, quiet=True)  # 99 seen
    with pytest.raises(DataQualityError, match=r"51 of 100 items skipped"):
        tally.add([Skipped("f50", "f50", "undecodable image")], quiet=True)


# ------------------------------------------------------------------------------------------------ study --only


def test_unknown_study_variant_is_an_error(tmp_path):
    from mllm.study.config import load_study, with_budget
    from mllm.study.runner import run_study

    study = load_study("configs/study/toy.yaml")
    with pytest.raises(ValueError, match=r"--only clipp: unknown variant\(s\); the study's variants are \[.*'clip'"):
        run_study(study, with_budget(study, True, 1), tmp_path, only=["clip", "clipp"])
    assert not any(tmp_path.iterdir())  # nothing was run or written


# ------------------------------------------------------------------------------------------------ both CLIs


def read_csv_metric(root: Path, name: str) -> list[float]:
    import csv

    (path,) = root.rglob("metrics.csv")
    with open(path) as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> dict:
    from tiny_teachers import write_timm_dir
    from tiny_llava import write_tiny_lm

    tmp = tmp_path_factory.mktemp("lm")
    return {"lm": str(write_tiny_lm(tmp / "lm", steps=2)), "vit": str(write_timm_dir(tmp / "vit"))}


def mllm_fit(tmp_path: Path, tiny_lm: dict, train: dict, max_length: int = 64) -> None:
    import yaml

    from mllm.cli import make_cli

    config = {
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False, "num_sanity_val_steps": 0,
                    "log_every_n_steps": 1, "default_root_dir": str(tmp_path / "run"), "enable_checkpointing": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "logs")}}},
        "model": {"tower": {"class_path": "mllm.towers.SingleEncoderTower", "init_args": {"grid": 2, "encoder": {
                      "class_path": "distill.encoders.TimmEncoder",
                      "init_args": {"model_name": f"local-dir:{tiny_lm['vit']}", "pretrained": True}}}},
                  "lm": tiny_lm["lm"], "stage": "align"},
        "data": {"train": train, "batch_size": 4, "image_size": 32, "max_length": max_length},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_cli(["fit", "-c", str(tmp_path / "config.yaml")])


def test_mllm_cli_fit_on_damaged_shards(tmp_path, shards, tiny_lm, capsys):
    """`python -m mllm fit` trains through every fault; train/skipped is the exact running total (ends at 11)."""
    mllm_fit(tmp_path, tiny_lm, {"class_path": "mllm.data.WebDataSource",
                                 "init_args": {"urls": str(shards / SHARD_URLS), "shuffle_buffer": 0}})
    skipped = read_csv_metric(tmp_path / "logs", "train/skipped")
    assert skipped == sorted(skipped) and skipped[-1] == 11.0  # cumulative, never re-added
    assert "data summary: [train] 40 items used, 11 skipped" in capsys.readouterr().out


def test_mllm_cli_fit_on_toy_export_shards(tmp_path, tiny_lm, capsys):
    """`python -m mllm fit` on `python -m distill.toy export` shards (was KeyError: 'conversations')."""
    from distill.toy.shards import export_shards
    from distill.toy.world import ToyWorld

    export_shards(ToyWorld(seed=0, image_size=32), tmp_path / "shards", count=8)
    mllm_fit(tmp_path, tiny_lm, {"class_path": "mllm.data.WebDataSource",
                                 "init_args": {"urls": str(tmp_path / "shards" / "000000.tar"), "shuffle_buffer": 0}},
             max_length=400)
    assert "data summary: [train] 8 items used, none skipped." in capsys.readouterr().out


def test_distill_cli_fit_on_damaged_shards(tmp_path, shards, tiny_teacher_files, capsys):
    """`python -m distill fit` trains through every fault and logs the exact running total. The training loader
    drops the last partial batch (drop_last): 51 items = 12 batches of 4 + 3 dropped items (shard 2's last sample,
    its truncation marker, the missing shard's marker), so 42 images are used and 6 of the 8 markers counted."""
    import yaml

    from distill.cli import lightning_cli

    files = tiny_teacher_files
    teacher = lambda name, cls, args: {"class_path": "distill.teacher.Teacher", "init_args": {
        "name": name, "encoder": {"class_path": cls, "init_args": args}}}
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_progress_bar": False,
                    "log_every_n_steps": 1, "default_root_dir": str(tmp_path / "run"), "enable_checkpointing": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "logs")}}},
        "model": {
            "student": {"class_path": "distill.model.StudentModel", "init_args": {
                "model_name": "vit_small_patch16_224", "summary_names": ["dino"], "num_registers": 0, "img_size": 16,
                "model_args": {"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 1}}},
            "teachers": [teacher("dino", "distill.encoders.TimmEncoder", {"model_name": f"local-dir:{files['dino']}", "crop_pct": 1.0})],
            "adaptor_hidden_dim": 16,
        },
        "data": {"train": {"class_path": "distill.data.ShardImages",
                           "init_args": {"urls": str(shards / SHARD_URLS), "resampled": False, "shuffle_buffer": 0}},
                 "image_size": 16, "batch_size": 4, "num_workers": 0},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lightning_cli(["fit", "-c", str(tmp_path / "config.yaml")])
    skipped = read_csv_metric(tmp_path / "logs", "train/skipped")
    # every damaged item of the shards is counted, the last partial batch's too (43 used + 8 skipped = all)
    assert skipped == sorted(skipped) and skipped[-1] == 8.0
    assert "data summary: [train] 43 items used, 8 skipped" in capsys.readouterr().out
