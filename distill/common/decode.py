"""One decode path for every image and tar shard both packages read, with one policy for bad data.

    image = decode_image(path_or_bytes, where="shard.tar :: 000012.jpg", file="shard.tar")  # RGB PIL or Skipped
    for item in tar_samples(["a.tar", "b.tar"]):      # webdataset-style sample dicts or Skipped markers
        ...

Policy (the same for distill and mllm):
- Every image is fully decoded here (truncated files fail here, not later in a transform) and converted to
  8-bit RGB: 16-bit integer grayscale ("I;16*", and "I", which PIL uses for 16-bit PNG / TIFF gray) is scaled
  from 0..65535 to 0..255 (PIL's convert("RGB") would clip it to white); 16-bit RGB(A) PNGs are already
  reduced to 8 bits by PIL's decoder; palette, CMYK, YCbCr, LAB, HSV, 1-bit and grayscale images go
  through PIL's conversion; images with alpha (RGBA, LA, PA, palette with transparency) are composited on
  a white background (what a browser shows on a white page), never left with the raw colour under
  transparent pixels. Float images ("F") have no defined range and are skipped with that reason.
- A file or member that cannot be used is never an exception and never silent: the loader returns a
  `Skipped` marker that names the file (or shard and member) and the reason. Datasets pass markers through to
  the batch, so the main process counts them exactly whatever the number of DataLoader workers.
- Tar shards are read with Python's tarfile in its tolerant mode (`ignore_zeros`), one member after the other.
  A garbage header mid-shard no longer ends the shard: the damaged bytes are skipped up to the next valid
  header and reported (one marker naming the shard, the byte range and the members either side); a truncated
  shard reports where it was cut; a missing or unreadable shard is one marker. A sample that loses a member
  this way is then skipped by the consumer ("no image member"), so each lost sample is counted once and each
  damaged region once more (a garbage header counts 2: "damaged tar header" + "no image member").
- The markers are counted by `distill.common.skips` (SkipTally / DataSkips) in the main process.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from distill.common.skips import Skipped

BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white


# ------------------------------------------------------------------------------------------------- images


def decode_image(data: bytes | str | Path, where: str, file: str | None = None) -> Image.Image | Skipped:
    """Fully decode `data` (bytes or a path) to an 8-bit RGB image, or a Skipped marker saying why not."""
    file = str(file if file is not None else where)
    if isinstance(data, (bytes, bytearray)):
        source: Any = io.BytesIO(data)
        if not data:
            return Skipped(where, file, "empty file", "0 bytes")
    else:
        source = data
        if not os.path.isfile(data):
            return Skipped(where, file, "missing file", f"{data} does not exist")
        if os.path.getsize(data) == 0:
            return Skipped(where, file, "empty file", "0 bytes")
    try:
        with Image.open(source) as image:
            # Truncated files are errors here, even where a library (lmms-eval does) set PIL's global to accept them.
            lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
            try:
                image.load()
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = lenient
            return to_rgb(image)
    except _Unusable as error:
        return Skipped(where, file, "unsupported image mode", str(error))
    except UnidentifiedImageError:
        return Skipped(where, file, "undecodable image", "UnidentifiedImageError: not an image format PIL knows "
                       f"(starts with {bytes(data[:16]) if isinstance(data, (bytes, bytearray)) else _head(data)!r}); "
                       "remove or re-encode it")
    except Exception as error:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return Skipped(where, file, "undecodable image", f"{type(error).__name__}: {error}; remove or re-encode it")


def _head(path: str | Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(16)


class _Unusable(ValueError):
    pass


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB copy of a decoded image following the module's policy (see the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)  # 0..65535 -> 0..255
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        raise _Unusable("32-bit float image: no defined value range; convert it to 8 or 16 bit")
    if mode == "P" and "transparency" in image.info or mode in ("PA", "LA", "La", "RGBa", "RGBA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


# ------------------------------------------------------------------------------------------------- tar shards


def tar_samples(urls: Iterable[str | dict]) -> Iterator[dict | Skipped]:
    """Samples (dicts of member extension -> bytes, plus `__key__` and `__url__`) of each shard in `urls`
    (paths, URLs or webdataset's {"url": ...} dicts), with Skipped markers for what could not be read.

    Members are grouped by key as webdataset does (`webdataset.tariterators.base_plus_ext`); a webdataset
    pipeline stage: `wds.DataPipeline(wds.SimpleShardList(urls), tar_samples_stage, ...)`."""
    for url in urls:
        url = url["url"] if isinstance(url, dict) else url
        yield from _group_by_key(_tar_members(url), url)


def tar_samples_stage(src: Iterable[dict]) -> Iterator[dict | Skipped]:
    """webdataset DataPipeline stage: shard dicts in, samples and Skipped markers out."""
    return tar_samples(src)


def _group_by_key(members: Iterator[tuple[str, bytes] | Skipped], url: str) -> Iterator[dict | Skipped]:
    from webdataset.tariterators import base_plus_ext

    current: dict | None = None
    for member in members:
        if isinstance(member, Skipped):
            yield member
            continue
        name, data = member
        key, ext = base_plus_ext(name)
        if key is None or re.match(r"__[^/]*__($|/)", name):
            continue
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        ext = ext.lower()
        if ext in current:
            yield Skipped(f"{url} :: {name}", url, "duplicate member", f"'{ext}' appears twice for key {key}")
            continue
        current[ext] = data
    if current is not None:
        yield current


def _open_shard(url: str):
    """A seekable binary file of the shard (local file as is; pipes and URLs buffered by webdataset's gopen)."""
    if "://" not in url and not url.startswith("pipe:"):
        return open(url, "rb")
    from webdataset import gopen

    stream = gopen.gopen(url)
    buffer = tempfile.SpooledTemporaryFile(max_size=256 << 20)
    with stream:
        while chunk := stream.read(1 << 20):
            buffer.write(chunk)
    buffer.seek(0)
    return buffer


def _tar_members(url: str) -> Iterator[tuple[str, bytes] | Skipped]:
    """(name, bytes) of each regular member; Skipped markers for a missing/unreadable shard, damaged regions
    (bytes between the end of one member and the next valid header that are not zero padding) and a
    truncated last member."""
    try:
        fileobj = _open_shard(url)
    except FileNotFoundError:
        yield Skipped(url, url, "missing shard", "the file does not exist; check the data urls")
        return
    except Exception as error:
        yield Skipped(url, url, "unreadable shard", f"{type(error).__name__}: {error}")
        return
    with fileobj:
        size = fileobj.seek(0, io.SEEK_END)
        fileobj.seek(0)
        try:
            tar = tarfile.open(fileobj=fileobj, mode="r:", ignore_zeros=True)
        except tarfile.TarError as error:
            detail = "0 bytes" if size == 0 else f"no valid tar header in {size} bytes ({error})"
            yield Skipped(url, url, "unreadable shard", detail)
            return
        expected, previous = 0, "the start"
        while True:
            try:
                info = tar.next()
            except tarfile.TarError:  # the previous member's data or padding runs past the end of the file
                yield Skipped(f"{url} :: {previous}", url, "truncated shard",
                              f"the file ends ({size} bytes) inside {previous}; later members are lost")
                return
            tar.members.clear()  # constant memory on large shards
            if info is None:
                break
            if info.offset > expected and _has_data(fileobj, expected, info.offset):
                yield Skipped(f"{url} :: bytes {expected}-{info.offset}", url, "damaged tar header",
                              f"unreadable bytes between {previous} and {info.name} skipped")
            expected = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            previous = info.name
            if not info.isreg():
                continue
            try:
                data = tar.extractfile(info).read()
            except tarfile.TarError as error:
                yield Skipped(f"{url} :: {info.name}", url, "truncated shard",
                              f"{error}: the file ends ({size} bytes) inside {info.name}; later members are lost")
                return
            yield info.name, data
        if previous == "the start":
            if _has_data(fileobj, 0, size):
                yield Skipped(url, url, "unreadable shard", f"no valid tar header in its {size} bytes")
        elif _has_data(fileobj, expected, size):
            kind = "truncated shard" if (size - expected) % tarfile.BLOCKSIZE else "damaged tar header"
            yield Skipped(f"{url} :: bytes {expected}-{size}", url, kind,
                          f"{size - expected} bytes after {previous} hold no readable member")
        elif size - expected < 2 * tarfile.BLOCKSIZE:
            yield Skipped(f"{url} :: {previous}", url, "truncated shard",
                          f"no end-of-archive marker after {previous}; the file was cut, later members are lost")


def _has_data(fileobj: Any, start: int, end: int) -> bool:
    """True if bytes [start, end) of `fileobj` are not all zero (tar padding is zero)."""
    position = fileobj.tell()
    fileobj.seek(start)
    remaining, nonzero = end - start, False
    while remaining > 0 and not nonzero:
        chunk = fileobj.read(min(remaining, 1 << 20))
        if not chunk:
            break
        nonzero = chunk.count(0) != len(chunk)
        remaining -= len(chunk)
    fileobj.seek(position)
    return nonzero
