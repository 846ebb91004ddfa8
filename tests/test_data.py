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
from distill.common.skips import Skipped


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
    items = [ds[i] for i in range(len(ds))]
    skipped = [x for x in items if isinstance(x, Skipped)]
    assert len(skipped) == 2
    messages = " ".join(x.message for x in skipped)
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
        batches = [dm.on_before_batch_transfer(batch, 0) for batch in dm.val_dataloader()]
    images = torch.cat(batches)
    assert images.shape == (3, 3, 16, 16)  # 4 samples, 1 undecodable
    assert sorted(round(v * 255) for v in images[:, 0, 0, 0].tolist()) == [1, 2, 3]
    assert any("000000.tar :: s1.jpg" in str(w.message) for w in record)
    assert dm.skips.train.by_reason == {"undecodable image": 1} and dm.skips.train.used == 3


def test_missing_shards_are_named(tmp_path):
    write_shard(tmp_path / "000000.tar", {"s0.png": png_bytes()})
    source = ShardImages(str(tmp_path / "{000000..000002}.tar"))
    with pytest.warns(UserWarning, match=r"2 of 3 shards do not exist.*000001.tar"):
        source.dataset(eval_transform(16))
    with pytest.raises(FileNotFoundError, match=r"None of the 2 shards exists.*000005.tar"):
        ShardImages(str(tmp_path / "{000005..000006}.tar")).dataset(eval_transform(16))
