"""In-training encoder benchmarks (distill/benchmarks, distill/encoders/probes.py): each score against hand-computed
values, SAM's prompt path against SamPredictor, the student path against the teacher's own embeddings, the teacher
scores against `unitower toy report`'s functions, and the callback in a 2-step fit with the smoke toy teachers.

    python -m pytest -q -p no:cacheprovider tests/test_benchmarks.py
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from segment_anything import SamPredictor

from distill.benchmarks import EncoderBenchmarks
from distill.benchmarks.sets import folder_probe_set, toy_probe_set
from distill.encoders import OpenClipEncoder, SamEncoder, TimmEncoder
from distill.encoders.probes import knn_accuracy, mask_iou, point_miou, predict_masks, zero_shot_accuracy
from distill.encoders.sam import build_sam
from distill.model import AdaptorOutput, StudentModel, StudentOutput
from distill.module import DistillModule
from distill.teacher import Teacher
from recipe_fit import fit_two_steps

STUDENT_ARGS = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}


# ---- scoring functions on synthetic features ----------------------------------------------------------
def test_knn_separable_clusters_score_one_and_shuffled_labels_score_chance():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=generator) * 10
    bank_ids = torch.arange(400) % 4
    query_ids = torch.arange(200) % 4
    bank = centers[bank_ids] + torch.randn(400, 16, generator=generator)
    query = centers[query_ids] + torch.randn(200, 16, generator=generator)
    names = ["a", "b", "c", "d"]
    bank_labels, query_labels = [names[i] for i in bank_ids], [names[i] for i in query_ids]
    assert knn_accuracy(bank, bank_labels, query, query_labels, k=10) == 1.0
    # labels unrelated to the features (no clusters, labels drawn independently): 4 classes -> 0.25 expected;
    # 1000 queries give a std of ~0.014
    bank, query = torch.randn(1000, 16, generator=generator), torch.randn(1000, 16, generator=generator)
    random_labels = [names[i] for i in torch.randint(4, (2000,), generator=generator).tolist()]
    assert abs(knn_accuracy(bank, random_labels[:1000], query, random_labels[1000:], k=10) - 0.25) < 0.06


def test_knn_vote_by_hand():
    # 1-D directions: bank at angles 0, 10, 20 deg (class x) and 90, 100 deg (class y); query at 50 deg.
    angles = torch.tensor([0.0, 10.0, 20.0, 90.0, 100.0]).deg2rad()
    bank = torch.stack([angles.cos(), angles.sin()], dim=1) * torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])  # scale ignored
    query = torch.tensor([[np.cos(np.deg2rad(50.0)), np.sin(np.deg2rad(50.0))]], dtype=torch.float32)
    labels = ["x", "x", "x", "y", "y"]
    # nearest 3 by cosine: 20 (x), 90 (y), 10 (x) -> x; nearest 2: 20 (x), 90 (y) -> tie -> first sorted class x
    assert knn_accuracy(bank, labels, query, ["x"], k=3) == 1.0
    assert knn_accuracy(bank, labels, query, ["y"], k=2) == 0.0
    # k larger than the bank: all 5 vote, x wins 3:2
    assert knn_accuracy(bank, labels, query, ["x"], k=50) == 1.0
    with pytest.raises(ValueError, match="one label per feature"):
        knn_accuracy(bank, labels[:4], query, ["x"])


def test_zero_shot_by_hand():
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(5, 8, generator=generator)
    classes = ["red", "green", "blue", "red", "green"]  # several prompts per class
    image = text[[0, 1, 2, 3, 4, 2]] * 3.0  # each image equals one prompt's features (any scale)
    labels = ["red", "green", "blue", "red", "green", "blue"]
    assert zero_shot_accuracy(image, text, classes, labels) == 1.0
    wrong = ["green", "blue", "red", "green", "blue", "red"]
    assert zero_shot_accuracy(image, text, classes, wrong) == 0.0
    assert zero_shot_accuracy(image, text, classes, labels[:3] + wrong[3:]) == 0.5
    with pytest.raises(ValueError, match="same CLIP embedding space"):
        zero_shot_accuracy(image[:, :4], text, classes, labels)


def test_mask_iou_by_hand():
    pred = torch.zeros(2, 4, 4, dtype=torch.bool)
    target = torch.zeros(2, 4, 4, dtype=torch.bool)
    pred[0, :2, :2] = True  # 4 pixels
    target[0, :2, :3] = True  # 6 pixels, 4 shared -> 4 / 6
    target[1, 0, 0] = True  # empty prediction -> 0
    assert torch.allclose(mask_iou(pred, target), torch.tensor([4 / 6, 0.0]))


def test_predict_masks_matches_sam_predictor_at_another_image_size():
    """Prompts in image pixels mapped to SAM's input frame and masks mapped back, as SamPredictor does (image 40x40
    for a 64 px SAM); the embedding is the predictor's own, so only the prompt / decoder / postprocess path is compared."""
    torch.manual_seed(0)
    sam = build_sam("tiny")
    image = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    points = np.array([[12.0, 30.0]])
    expected, _, _ = predictor.predict(point_coords=points, point_labels=np.array([1]), multimask_output=False,
                                       return_logits=True)
    logits, _ = predict_masks(sam, predictor.features, points=torch.tensor(points, dtype=torch.float32)[None],
                              image_hw=(40, 40))
    assert logits.shape == (1, 40, 40)
    assert torch.allclose(logits, torch.from_numpy(expected), atol=1e-5)


def test_point_miou_rejects_embeddings_off_sams_grid():
    sam = build_sam("tiny")
    with pytest.raises(ValueError, match=r"\[C, 8, 8\]"):
        point_miou(sam, torch.zeros(1, 64, 4, 4), [torch.ones(1, 64, 64, dtype=torch.bool)])


# ---- probe sets ------------------------------------------------------------------------------------------------
def test_toy_probe_set_labels_and_masks():
    probe_set = toy_probe_set(image_size=48, num_bank=6, num_query=4, num_masked=3)
    assert probe_set.bank.images.shape == (6, 3, 48, 48) and probe_set.bank.images.dtype == torch.uint8
    assert set(probe_set.query.labels) == {"texture", "shape", "color"} and len(probe_set.query.labels["shape"]) == 4
    assert probe_set.prompts == ["a circle.", "a square.", "a triangle.", "a cross."]
    assert probe_set.prompt_classes == {"shape": ["circle", "square", "triangle", "cross"]}
    assert len(probe_set.masks) == 3 and probe_set.masks[0].shape[-2:] == (48, 48)
    assert all(m.dtype == torch.bool and m.any() for m in probe_set.masks)


def _write_folder(root, classes: dict[str, tuple[int, int, int]], count: int, size: int = 20) -> None:
    for name, rgb in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (size + i, size), rgb).save(root / name / f"{i}.png")


def test_folder_probe_set_split_labels_and_prompts(tmp_path):
    _write_folder(tmp_path, {"red_fox": (255, 0, 0), "blue_jay": (0, 0, 255)}, count=6)
    probe_set = folder_probe_set(tmp_path, image_size=16, num_bank=8, num_query=4, templates=["a {}.", "the {}."])
    assert probe_set.query.images.shape == (4, 3, 16, 16) and probe_set.bank.images.shape == (8, 3, 16, 16)
    assert probe_set.prompts == ["a blue jay.", "the blue jay.", "a red fox.", "the red fox."]
    assert probe_set.prompt_classes == {"class": ["blue_jay", "blue_jay", "red_fox", "red_fox"]}
    # the label of every image is its folder: red images are red_fox
    for images, labels in ((probe_set.bank.images, probe_set.bank.labels["class"]),
                           (probe_set.query.images, probe_set.query.labels["class"])):
        red = images[:, 0, 8, 8] > 200
        assert [("red_fox" if r else "blue_jay") for r in red.tolist()] == labels
    # mean colour is a perfect feature here
    assert knn_accuracy(probe_set.bank.images.float().mean((2, 3)), probe_set.bank.labels["class"],
                        probe_set.query.images.float().mean((2, 3)), probe_set.query.labels["class"], k=3) == 1.0


def test_folder_probe_set_train_val_layout_and_errors(tmp_path):
    _write_folder(tmp_path / "train", {"a": (255, 0, 0), "b": (0, 255, 0)}, count=3)
    _write_folder(tmp_path / "val", {"a": (255, 0, 0), "b": (0, 255, 0)}, count=2)
    probe_set = folder_probe_set(tmp_path, image_size=16, num_bank=100, num_query=100)
    assert len(probe_set.bank.images) == 6 and len(probe_set.query.images) == 4
    with pytest.raises(FileNotFoundError, match="does not exist"):
        folder_probe_set(tmp_path / "missing", 16, 4, 4)
    with pytest.raises(ValueError, match="must each hold"):
        folder_probe_set(tmp_path, 16, 4, 4, templates=["no slot"])
    with pytest.raises(ValueError, match="sam_miou needs ground-truth masks"):
        EncoderBenchmarks(labelled_folder=str(tmp_path))


# ---- the callback's student and teacher paths with the smoke toy teachers -----------------------------
def _module(teachers: list[Teacher]) -> DistillModule:
    names = [t.name for t in teachers if t.has_summary]
    student = StudentModel("vit_small_patch16_224", names, num_registers=1, img_size=64, model_args=STUDENT_ARGS)
    return DistillModule(student, teachers, adaptor_hidden_dim=32)


def test_sam_student_path_with_the_teachers_embeddings_gives_the_teachers_score(tiny_teacher_files):
    """The student path (adaptor dense map -> SAM grid -> SAM's prompt encoder + mask decoder) fed the SAM teacher's
    own embeddings scores exactly what the teacher scores."""
    torch.manual_seed(0)
    teacher = Teacher("sam", SamEncoder("tiny", str(tiny_teacher_files["sam"])))
    module = _module([teacher])

    def forward(images, layer=-1, adaptors=None, teacher_space=False):
        dense = teacher.targets(images).dense
        return StudentOutput(summary={}, dense=dense, tokens=dense, adaptors={"sam": AdaptorOutput(None, dense)})

    bench = EncoderBenchmarks(probes=["sam_miou"], num_mask_images=24, batch_size=10)
    real = bench.score(module)
    assert real["bench/sam_miou/sam"] > 0  # a random SAM still overlaps some masks: the check below is not 0 == 0
    module.student.forward = forward
    bench = EncoderBenchmarks(probes=["sam_miou"], num_mask_images=24, batch_size=10)
    scores = bench.score(module)
    assert scores["bench/sam_miou/student"] == scores["bench/sam_miou/sam"] == real["bench/sam_miou/sam"]
    assert real["bench/sam_miou/student"] != real["bench/sam_miou/sam"]


def test_teacher_scores_match_the_toy_report(smoke_world):
    """The callback's teacher scores (through the teacher wrappers, images in [0, 1]) are the skill report's
    numbers on the same images (`unitower toy report` functions, native library calls on uint8 images)."""
    import open_clip
    import timm

    from distill.common.names import resolve_model_name, resolve_path
    from distill.toy.skills import clip_zero_shot, dino_knn, sam_point_miou

    teachers = [Teacher("clip", OpenClipEncoder("toy:clip")), Teacher("dino", TimmEncoder("toy:dino", crop_pct=1.0)),
                Teacher("sam", SamEncoder("tiny", "toy:sam"))]
    bench = EncoderBenchmarks(num_bank=200, num_query=100, num_mask_images=40)
    scores = bench.score(_module(teachers))
    clip_name = resolve_model_name("toy:clip")
    report = {
        **clip_zero_shot(open_clip.create_model(clip_name).eval(), open_clip.get_tokenizer(clip_name), num_images=100),
        **{f"knn_{k}": v for k, v in dino_knn(timm.create_model(resolve_model_name("toy:dino"), pretrained=True).eval(),
                                             num_bank=200, num_query=100).items()},
        **sam_point_miou(build_sam("tiny", resolve_path("toy:sam")), num_images=40),
    }
    one = 1 / 100 + 1e-9  # at most one query may flip on float noise (different preprocessing arithmetic)
    assert abs(scores["bench/zeroshot_shape/clip"] - report["shape_acc"]) <= one
    assert abs(scores["bench/zeroshot_shape/clip"] - report["shape_acc"]) <= one
    assert abs(scores["bench/knn_texture/dino"] - report["knn_texture_acc"]) <= one
    assert abs(scores["bench/knn_shape/dino"] - report["knn_shape_acc"]) <= one
    assert abs(scores["bench/sam_miou/sam"] - report["point_miou"]) < 0.01


def test_callback_refuses_a_missing_teacher(tiny_teacher_files):
    module = _module([Teacher("sam", SamEncoder("tiny", str(tiny_teacher_files["sam"])))])
    with pytest.raises(ValueError, match=r"teacher 'dino'.*knn_teacher"):
        EncoderBenchmarks(probes=["knn"]).setup(None, module, "fit")
    clip = Teacher("clip", OpenClipEncoder(f"local-dir:{tiny_teacher_files['clip']}", layer=-2))
    with pytest.raises(ValueError, match="OpenClipEncoder at layer -1"):
        EncoderBenchmarks(probes=["zeroshot"]).setup(None, _module([clip]), "fit")
    with pytest.raises(ValueError, match="subset of"):
        EncoderBenchmarks(probes=["linear"])


KEYS = [f"bench/{probe}/{who}" for probe in ("knn_texture", "knn_shape")
        for who in ("student", "student_pooled", "student_dino", "dino")]
KEYS += [f"bench/{probe}/{who}" for probe in ("zeroshot_shape",) for who in ("student", "clip")]
KEYS += ["bench/sam_miou/student", "bench/sam_miou/sam"]


def test_callback_logs_every_key_in_a_two_step_fit(smoke_world, tmp_path, monkeypatch):
    """configs/distill/toy.yaml (smoke toy teachers, dense_loss mse) for 2 steps with a small benchmark: every key is
    logged at the start (step 0, after the mse calibration) and at the validation after step 2."""
    calibrated = []
    score = EncoderBenchmarks.score

    def recording_score(self, pl_module):
        calibrated.append(all(norm.fitted for norm in pl_module.dense_norm.values()))
        return score(self, pl_module)

    monkeypatch.setattr(EncoderBenchmarks, "score", recording_score)

    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "distill" / "toy.yaml").read_text())
    bench = [c for c in config["trainer"]["callbacks"] if c["class_path"] == "distill.benchmarks.EncoderBenchmarks"]
    assert bench and bench[0]["init_args"]["probes"] == ["knn", "zeroshot", "sam_miou"]  # the recipe has it
    config["model"]["student"]["init_args"]["model_args"] = STUDENT_ARGS
    config["model"].update(warmup_steps=1, dense_loss="mse", calibration_batches=1)
    cli = fit_two_steps(config, tmp_path, callbacks=[{"class_path": "distill.benchmarks.EncoderBenchmarks",
                                                      "init_args": {"num_bank": 40, "num_query": 20, "num_mask_images": 6}}])
    assert calibrated == [True, True]  # scored at the start (with fitted normalizers) and at the one validation
    metrics = cli.trainer.callback_metrics
    assert sorted(k for k in metrics if k.startswith("bench/")) == sorted(KEYS)
    assert all(0.0 <= float(metrics[k]) <= 1.0 for k in KEYS)
    rows = list(csv.DictReader((tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()))
    start = [r for r in rows if r["step"] == "0" and r.get("bench/sam_miou/sam")]
    assert start and all(start[0][k] != "" for k in KEYS)  # the at_start row: student before any step
    end = [r for r in rows if r.get("bench/knn_texture/student") and r["step"] != "0"]
    assert end and all(end[-1][k] != "" for k in KEYS)


def test_callback_on_a_labelled_folder(tiny_teacher_files, tmp_path):
    """knn + zeroshot on an ImageFolder layout with the tiny teachers: keys named after the folder's `class`."""
    _write_folder(tmp_path, {"red_fox": (255, 0, 0), "blue_jay": (0, 0, 255), "green_frog": (0, 255, 0)}, count=6)
    teachers = [Teacher("clip", OpenClipEncoder(f"local-dir:{tiny_teacher_files['clip']}")),
                Teacher("dino", TimmEncoder(f"local-dir:{tiny_teacher_files['dino']}", crop_pct=1.0))]
    bench = EncoderBenchmarks(probes=["knn", "zeroshot"], labelled_folder=str(tmp_path), num_bank=12, num_query=6,
                              image_size=32, knn_k=1)
    scores = bench.score(_module(teachers))
    assert sorted(scores) == sorted([f"bench/knn_class/{w}" for w in ("student", "student_pooled", "student_dino", "dino")]
                                    + ["bench/zeroshot_class/student", "bench/zeroshot_class/clip"])
    # solid colours: every image of a class has the same features, so the nearest bank image has the query's class
    assert set(bench.probe_set.query.labels["class"]) <= set(bench.probe_set.bank.labels["class"])
    assert scores["bench/knn_class/dino"] == scores["bench/knn_class/student"] == 1.0
    assert bench.probe_set.prompts == ["a photo of a blue jay.", "a photo of a green frog.", "a photo of a red fox."]
