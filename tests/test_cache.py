"""Teacher-feature cache (distill/cache): codec round trips, crops identical to the training augmentation,
cache written by `python -m distill cache` read back as the teachers' own outputs, data module batches with
targets that resume exactly, and DistillModule training from cached targets without running the teachers."""

import json
import tarfile
import zlib

import pytest
import torch
import yaml
from PIL import Image

from distill.cache.budget import allocate, compressed_bytes_per_token, fit_compressed
from distill.cache.codec import PcaCodec, pca, token_cosines
from distill.cache.layout import teacher_bytes
from distill.cache.dataset import CachedViews
from distill.cache.views import apply_view, draw_view
from distill.data import DistillDataModule, ToyImages
from distill.data.augment import train_transform
from distill.encoders import OpenClipEncoder, SamEncoder, TimmEncoder
from distill.teacher import Teacher

IMAGE = 32


def low_rank_tokens(n=2000, channels=32, rank=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, channels, generator=g) + 3 * torch.randn(channels, generator=g)


@pytest.mark.parametrize("bits", [8, 4])
def test_codec_round_trip_and_save(tmp_path, bits):
    tokens = low_rank_tokens()
    fitted = PcaCodec.fit(tokens[:1000], components=8)
    codec = PcaCodec(fitted.mean, fitted.basis, fitted.std, bits)
    q, scale = codec.encode(tokens[1000:])
    assert q.shape == (1000, 8 * bits // 8) and scale.dtype == torch.float16
    # 4-bit codes unpack to the levels the encoder rounded to
    coeffs = (tokens[1000:] - codec.mean) @ codec.basis / codec.std
    levels = torch.round(coeffs / scale.float()[:, None]).clamp(-codec.levels, codec.levels)
    assert torch.equal(codec.unpack(q), levels)
    cos = token_cosines(codec.decode(q, scale), tokens[1000:])
    # rank-6 data: only quantization error remains
    assert cos.min() > (0.9999 if bits == 8 else 0.98) and cos.mean() > (0.99999 if bits == 8 else 0.995)
    codec.save(tmp_path / "c.safetensors")
    loaded = PcaCodec.load(tmp_path / "c.safetensors")
    assert loaded.bits == bits and torch.equal(loaded.decode(q, scale), codec.decode(q, scale))


def test_codec_budget_picks_the_best_layout_within_bytes():
    tokens = low_rank_tokens(channels=64, rank=64)
    codec = PcaCodec.fit_within(tokens, bytes_per_token=18)
    assert codec.bytes_per_token() <= 18
    best = float(token_cosines(codec.decode(*codec.encode(tokens)), tokens).mean())
    mean, vectors, std = pca(tokens)
    for bits, head, k in ((8, 0, 16), (4, 0, 32), (4, 4, 24)):  # every layout that fills 18 bytes, alpha 1 and 0.5
        for alpha in (1.0, 0.5):
            other = PcaCodec(mean, vectors[:, :k], std[:k], bits, alpha, head)
            assert other.bytes_per_token() == 18
            assert best >= float(token_cosines(other.decode(*other.encode(tokens)), tokens).mean()) - 1e-6


def test_codec_with_an_int8_head_round_trips(tmp_path):
    """An int8 head of 4 components + 12 4-bit ones, half-whitened: two scales per token, exact levels, saved
    and loaded; 4 + 6 code bytes + 2 fp16 scales = 14 bytes per token."""
    tokens = low_rank_tokens(channels=32, rank=16)
    mean, vectors, std = pca(tokens[:1000])
    codec = PcaCodec(mean, vectors[:, :16], std[:16], bits=4, alpha=0.5, head=4)
    q, scale = codec.encode(tokens[1000:])
    assert q.dtype == torch.uint8 and q.shape == (1000, 10) and scale.shape == (1000, 2)
    assert codec.bytes_per_token() == 14
    coeffs = (tokens[1000:] - mean) @ vectors[:, :16] / codec.std.sqrt()
    expected = torch.cat([torch.round(coeffs[:, :4] / scale[:, :1].float()).clamp(-127, 127),
                          torch.round(coeffs[:, 4:] / scale[:, 1:].float()).clamp(-7, 7)], dim=1)
    assert torch.equal(codec.unpack(q), expected)
    cos = token_cosines(codec.decode(q, scale), tokens[1000:])
    assert cos.mean() > 0.995  # rank-16 data in 16 components: quantization error only
    codec.save(tmp_path / "h.safetensors")
    loaded = PcaCodec.load(tmp_path / "h.safetensors")
    assert (loaded.bits, loaded.alpha, loaded.head) == (4, 0.5, 4)
    assert torch.equal(loaded.decode(q, scale), codec.decode(q, scale))
    with pytest.raises(ValueError, match="int8 head"):
        PcaCodec(mean, vectors[:, :16], std[:16], bits=8, head=4)


def test_fit_compressed_buys_components_with_the_bytes_zlib_saves():
    """Codes of a decaying spectrum compress; the fitted codec's compressed bytes stay within the budget while
    its raw bytes exceed it (more components than `fit_within` at the same budget), and it is more faithful."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(4096, 64, generator=g) * torch.logspace(0, -1.5, 64)  # decaying variances
    plain = PcaCodec.fit_within(tokens, 20)
    codec, stored = fit_compressed(tokens, 20.0, tokens_per_view=64)
    assert stored <= 20.0 and stored == pytest.approx(compressed_bytes_per_token(codec, tokens, 64))
    assert codec.bytes_per_token() > 20 >= plain.bytes_per_token()
    fidelity = [float(token_cosines(c.decode(*c.encode(tokens)), tokens).mean()) for c in (plain, codec)]
    assert fidelity[1] > fidelity[0]


def test_allocate_moves_bytes_to_the_teacher_that_needs_them():
    """One budget for all teachers: an easy (rank-4) teacher gives bytes to a hard (flat-spectrum) one; the total
    compressed bytes stay within the summed budget and the worst cosine is at least the equal split's."""
    g = torch.Generator().manual_seed(0)
    easy = torch.randn(2048, 4, generator=g) @ torch.randn(4, 48, generator=g) + 0.01 * torch.randn(2048, 48, generator=g)
    hard = torch.randn(2048, 48, generator=g) * torch.logspace(0, -0.5, 48)
    teachers = {"easy": (easy, 14.0, 64), "hard": (hard, 14.0, 64)}
    chosen = allocate(teachers)
    equal = {n: fit_compressed(t, b, v)[0] for n, (t, b, v) in teachers.items()}

    def cos(codec, tokens):
        return float(token_cosines(codec.decode(*codec.encode(tokens)), tokens).mean())

    stored = sum(compressed_bytes_per_token(chosen[n], t, v) * v for n, (t, _, v) in teachers.items())
    assert stored <= 2 * 14.0 * 64 + 1e-6
    assert chosen["hard"].components > equal["hard"].components and chosen["easy"].components < equal["easy"].components
    assert min(cos(chosen[n], t) for n, (t, _, _) in teachers.items()) > min(cos(equal[n], t) for n, (t, _, _) in teachers.items())


def test_views_equal_the_training_augmentation():
    """A stored view drawn with the same generator state gives exactly train_transform's tensor."""
    image = Image.fromarray((torch.rand(50, 70, 3) * 255).byte().numpy())
    for seed in range(5):
        torch.manual_seed(seed)
        expected = train_transform(IMAGE, min_scale=0.4, hflip=True)(image)
        torch.manual_seed(seed)
        got = apply_view(image, draw_view(image, min_scale=0.4, hflip=True), IMAGE)
        assert torch.equal(got, expected)


def teachers(files):
    return [Teacher("clip", OpenClipEncoder(f"local-dir:{files['clip']}")),
            Teacher("dino", TimmEncoder(f"local-dir:{files['dino']}", crop_pct=1.0)),
            Teacher("sam", SamEncoder("tiny", str(files["sam"])))]


def fit_config(tmp_path, files, cache=None):
    student_args = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}
    enc = {"clip": {"class_path": "distill.encoders.OpenClipEncoder", "init_args": {"model_name": f"local-dir:{files['clip']}"}},
           "dino": {"class_path": "distill.encoders.TimmEncoder",
                    "init_args": {"model_name": f"local-dir:{files['dino']}", "crop_pct": 1.0}},
           "sam": {"class_path": "distill.encoders.SamEncoder", "init_args": {"variant": "tiny", "checkpoint": str(files["sam"])}}}
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 3, "logger": False, "enable_progress_bar": False,
                    "enable_checkpointing": False, "default_root_dir": str(tmp_path / "run"), "limit_val_batches": 0},
        "model": {"student": {"class_path": "distill.model.StudentModel", "init_args": {
                      "model_name": "vit_small_patch16_224", "summary_names": ["clip", "dino"], "img_size": IMAGE,
                      "model_args": student_args}},
                  "teachers": [{"class_path": "distill.teacher.Teacher", "init_args": {"name": n, "encoder": e}}
                               for n, e in enc.items()],
                  "adaptor_hidden_dim": 32, "warmup_steps": 1},
        "data": {"train": {"class_path": "distill.data.ToyImages", "init_args": {"image_size": 40, "length": 24}},
                 "image_size": IMAGE, "batch_size": 4, "num_workers": 0, "min_scale": 0.5,
                 **({"teacher_cache": str(cache)} if cache else {})},
    }
    path = tmp_path / ("cached.yaml" if cache else "config.yaml")
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_teacher_files):
    """`python -m distill cache` over 24 toy images, 2 views each, shards of 10 images (default budget: 1/5 of
    Theia's bytes per view)."""
    from distill.cli import main

    tmp = tmp_path_factory.mktemp("cache")
    config = fit_config(tmp, tiny_teacher_files)
    out = tmp / "cache"
    main(["cache", "-c", str(config), "--out", str(out), "--views", "2", "--shard-size", "10",
          "--calibration-images", "12", "--workers", "0"])
    return out


def test_cache_files_and_bytes(cache_dir):
    meta = json.loads((cache_dir / "meta.json").read_text())
    assert meta["images"] == 24 and meta["shards"] == 3 and meta["views"] == 2 and meta["image_size"] == IMAGE
    # budget per view: 1/5 of Theia's bf16 bytes (these 32 px maps are so small that the tar header is not counted)
    assert meta["bytes_per_image"]["ratio_payload"] <= 0.2 * 2
    for name, t in meta["per_teacher"].items():
        assert t["bytes_per_view"] <= 0.2 * t["theia_bytes_per_image"], name
    # plain webdataset shards: <key>.png / .json / .tgt members, the index points at the members' data
    index = json.loads((cache_dir / "index.json").read_text())["samples"]
    rec = index[13]
    with tarfile.open(cache_dir / rec["shard"]) as tar:
        names = tar.getnames()
        assert names[:3] == [f"{index[10]['key']}.png", f"{index[10]['key']}.json", f"{index[10]['key']}.tgt"]
        member = tar.getmember(f"{rec['key']}.tgt")
        assert member.offset_data == rec["tgt"][0] and member.size == rec["tgt"][1]
        assert json.loads(tar.extractfile(f"{rec['key']}.json").read()) == rec["views"]
        # the targets member is zlib data of exactly the layout's size: views x (summary fp16 + codes + scales)
        raw = zlib.decompress(tar.extractfile(f"{rec['key']}.tgt").read())
    codecs = {n: PcaCodec.load(cache_dir / f"codec-{n}.safetensors") for n in meta["per_teacher"]}
    per_view = sum(teacher_bytes(t["summary_dim"], t["grid"][0] * t["grid"][1], codecs[t["name"]].bytes_per_token())
                   for t in meta["teachers"])
    assert meta["compression"] == "zlib" and len(raw) == 2 * per_view == meta["bytes_per_image"]["targets_payload"]
    assert meta["bytes_per_image"]["targets_compressed"] < meta["bytes_per_image"]["targets_payload"]


def test_uncompressed_caches_from_before_zlib_still_load(tmp_path, monkeypatch, cache_dir, tiny_teacher_files):
    """A cache whose .tgt members are stored raw and whose meta.json has no "compression" (the layout before
    zlib) reads back the same targets as the compressed cache built from the same images."""
    from distill.cache import writer
    from distill.cli import main

    monkeypatch.setattr(writer, "_store", lambda data: data)
    out = tmp_path / "raw"
    main(["cache", "-c", str(fit_config(tmp_path, tiny_teacher_files)), "--out", str(out), "--views", "2",
          "--shard-size", "10", "--calibration-images", "12", "--workers", "0"])
    meta = json.loads((out / "meta.json").read_text())
    meta.pop("compression")
    (out / "meta.json").write_text(json.dumps(meta))
    old, new = CachedViews(out, IMAGE), CachedViews(cache_dir, IMAGE)
    assert old.samples[5]["tgt"][1] > new.samples[5]["tgt"][1]  # raw members are larger
    for index in (0, 5, 23):
        torch.manual_seed(index)
        a = old[index]
        torch.manual_seed(index)
        b = new[index]
        assert torch.equal(a["image"], b["image"])
        for name in a["targets"]:
            for part in a["targets"][name]:
                assert torch.equal(a["targets"][name][part], b["targets"][name][part]), (name, part)


def test_cached_targets_match_teachers_on_the_student_crop(cache_dir, tiny_teacher_files):
    """Targets read back for the crop the student gets are the codec's reconstruction of the teachers run on
    that crop: the route adds nothing to the compression error (the summary is fp16)."""
    ds = CachedViews(cache_dir, IMAGE)
    views_seen = set()
    for index in range(0, 24, 3):
        torch.manual_seed(index)
        item = ds[index]
        views_seen.add(tuple(item["image"].flatten()[:5].tolist()))
        for teacher in teachers(tiny_teacher_files):
            online = teacher.targets(item["image"][None])
            cached = item["targets"][teacher.name]
            assert cached["dense"].shape == online.dense.shape[1:]
            tokens = online.dense[0].flatten(1).T
            expected = ds.codecs[teacher.name].decode(*ds.codecs[teacher.name].encode(tokens))
            cos = token_cosines(cached["dense"].flatten(1).T, expected)
            assert cos.min() > 0.999, (teacher.name, cos.min())  # batch-order float noise can flip a code
            if online.summary is not None:
                assert token_cosines(cached["summary"][None], online.summary) > 0.9999  # fp16 summary
    with pytest.raises(ValueError, match="image_size 32"):
        CachedViews(cache_dir, 48)


def test_datamodule_with_cache_resumes_exactly(cache_dir):
    def loader():
        dm = DistillDataModule(ToyImages(length=4), image_size=IMAGE, batch_size=4, num_workers=0, seed=0,
                               teacher_cache=str(cache_dir))
        return dm, dm.train_dataloader()

    dm, first = loader()
    it = iter(first)
    batches = [next(it) for _ in range(4)]
    assert set(batches[0]["targets"]) == {"clip", "dino", "sam"}
    assert batches[0]["targets"]["dino"]["summary"].shape[0] == 4
    state = {"epoch": 0, "position": 2, "iterable": False}
    _, second = loader()
    second.load_state_dict(state)
    resumed = next(iter(second))
    assert torch.equal(resumed["images"], batches[2]["images"])
    assert torch.equal(resumed["targets"]["sam"]["dense"], batches[2]["targets"]["sam"]["dense"])
    out = dm.on_before_batch_transfer.__func__(type("D", (), {"skips": dm.skips, "trainer": None})(), batches[0], 0)
    assert set(out) == {"images", "targets"}


def test_module_trains_from_cached_targets_without_teachers(cache_dir, tiny_teacher_files):
    from distill.cache.dataset import collate_cached
    from distill.module import DistillModule
    from distill.model import StudentModel

    student = StudentModel("vit_small_patch16_224", ["clip", "dino"], img_size=IMAGE,
                         model_args={"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2})
    module = DistillModule(student, teachers(tiny_teacher_files), adaptor_hidden_dim=32)
    module.log = lambda *a, **k: None
    ds = CachedViews(cache_dir, IMAGE)
    batch = collate_cached([ds[i] for i in range(4)])
    online = module.teacher_losses(batch["images"], "train")
    for teacher in module.teachers:
        teacher.targets = lambda images: (_ for _ in ()).throw(AssertionError("teacher ran"))
    cached = module.training_step({"images": batch["images"], "targets": batch["targets"]}, 0)
    cached.backward()
    assert abs(cached.item() - online.item()) < 0.05 * online.item()  # same crop, only compression differs
    assert module.student.model.patch_embed.proj.weight.grad is not None


def test_cli_fit_with_teacher_cache(tmp_path, cache_dir, tiny_teacher_files):
    from distill.cli import lightning_cli

    cli = lightning_cli(["fit", "-c", str(fit_config(tmp_path, tiny_teacher_files, cache=cache_dir))])
    assert cli.trainer.global_step == 3
