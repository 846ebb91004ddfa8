"""Distillation data: image folders and webdataset shards skip and count bad images, missing inputs
raise errors that name them, and augmentation yields square [0, 1] tensors."""

import io
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data import DistillDataModule, ImageFolder, ShardImages
from distill.data.augment import eval_transform, train_transform


def png_bytes(size=(40, 30), value=128) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_transforms_give_square_unit_range():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    for tf in (train_transform(32), eval_transform(32)):
        x = tf(image)
        assert x.shape == (3, 32, 32) and 0.0 <= x.min() and x.max() <= 1.0


def test_folder_skips_and_counts_bad_images(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.png").write_bytes(png_bytes(value=10))
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "tiny.png").write_bytes(png_bytes(size=(4, 4)))
    ds = ImageFolder(str(tmp_path), min_size=16).dataset(eval_transform(16))
    assert len(ds) == 4
    with pytest.warns(UserWarning) as record:
        items = [ds[i] for i in range(len(ds))]
    assert sum(x is None for x in items) == 2 and ds.skipped.count == 2
    messages = " ".join(str(w.message) for w in record)
    assert "broken.jpg" in messages and "tiny.png" in messages and "smaller than min_size=16" in messages


def test_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        ImageFolder(str(tmp_path / "missing_dir")).dataset(eval_transform(16))
    with pytest.raises(FileNotFoundError, match="No images"):
        ImageFolder(str(tmp_path)).dataset(eval_transform(16))


def test_shards_skip_corrupt_and_read_every_good_sample(tmp_path):
    write_shard(tmp_path / "000000.tar", {"s0.png": png_bytes(value=1), "s1.jpg": b"garbage", "s1.json": b"{}"})
    write_shard(tmp_path / "000001.tar", {"s2.png": png_bytes(value=2), "s3.png": png_bytes(value=3)})
    source = ShardImages(str(tmp_path / "{000000..000001}.tar"), resampled=False, shuffle_buffer=0)
    dm = DistillDataModule(train=source, val=source, image_size=16, batch_size=8, num_workers=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        batches = list(dm.val_dataloader())
    images = torch.cat(batches)
    assert images.shape == (3, 3, 16, 16)  # 4 samples, 1 undecodable
    assert sorted(round(v * 255) for v in images[:, 0, 0, 0].tolist()) == [1, 2, 3]
    assert any("s1 in" in str(w.message) and "000000.tar" in str(w.message) for w in record)


def test_missing_shard_is_named(tmp_path):
    write_shard(tmp_path / "000000.tar", {"s0.png": png_bytes()})
    source = ShardImages(str(tmp_path / "{000000..000002}.tar"))
    with pytest.raises(FileNotFoundError, match=r"2 of 3 shards do not exist.*000001.tar"):
        source.dataset(eval_transform(16))


def test_resampled_shards_stream_forever(tmp_path):
    write_shard(tmp_path / "000000.tar", {"s0.png": png_bytes()})
    ds = ShardImages(str(tmp_path / "000000.tar"), resampled=True, shuffle_buffer=0).dataset(train_transform(16))
    it = iter(ds)
    assert all(next(it).shape == (3, 16, 16) for _ in range(5))
