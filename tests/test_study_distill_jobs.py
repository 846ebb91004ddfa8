"""mllm/study/distill_jobs.py: which student variants share a seed's teacher pass, the recipe that trains them
together, and each student's own validation metrics."""

from __future__ import annotations

from pathlib import Path

import yaml

from mllm.study.config import Variant
from mllm.study.distill_jobs import DistillJob, distill_jobs, job_config, member_metrics, merge

ROOT = Path(__file__).resolve().parents[1]
RECIPE = yaml.safe_load((ROOT / "configs" / "distill" / "toy.yaml").read_text())
SMALL = ROOT / "configs" / "distill" / "overlays" / "toy_small_student.yaml"


def student(name: str, overlay: Path | None = None) -> Variant:
    return Variant(name=name, kind="student", tower={}, distill_overlay=str(overlay) if overlay else None)


def test_merge_puts_nested_keys_on_top_and_replaces_the_rest():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 3}
    assert merge(base, {"a": {"c": [9]}, "e": 4}) == {"a": {"b": 1, "c": [9]}, "d": 3, "e": 4}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 3}  # not changed


def test_student_only_overlays_share_each_seeds_pass_and_others_run_alone(tmp_path):
    steps = tmp_path / "steps.yaml"
    steps.write_text(yaml.safe_dump({"trainer": {"max_steps": 5}}))
    variants = [student("student"), student("student_small", SMALL), student("student_steps", steps),
                student("dino", SMALL), student("small-2", SMALL)]
    jobs = distill_jobs(variants, [0, 1], RECIPE)
    small = yaml.safe_load(SMALL.read_text())
    assert [(j.seed, [n for n, _ in j.members]) for j in jobs] == [
        (0, ["student", "student_small"]), (0, ["student_steps"]), (0, ["dino"]), (0, ["small-2"]),
        (1, ["student", "student_small"]), (1, ["student_steps"]), (1, ["dino"]), (1, ["small-2"])]
    assert jobs[0].members == [("student", None), ("student_small", small)] and jobs[0].separate_overlay is None
    # a teacher's name or a non-identifier cannot name a model.students entry; a non-student overlay needs `-c`
    assert jobs[1].separate_overlay == {"trainer": {"max_steps": 5}} and jobs[2].separate_overlay == small


def test_job_config_trains_the_overlays_student_beside_the_recipes():
    small = yaml.safe_load(SMALL.read_text())
    cfg = job_config(RECIPE, DistillJob(0, [("student", None), ("student_small", small)]))
    assert cfg["model"]["student"] == RECIPE["model"]["student"]
    (extra,) = cfg["model"]["students"]
    assert extra["class_path"] == "distill.students.StudentSpec" and extra["init_args"]["name"] == "student_small"
    args = extra["init_args"]["student"]["init_args"]
    assert args["model_args"] == small["model"]["student"]["init_args"]["model_args"]
    assert {k: v for k, v in args.items() if k != "model_args"} == {
        k: v for k, v in RECIPE["model"]["student"]["init_args"].items() if k != "model_args"}
    assert {k: v for k, v in cfg.items() if k != "model"} == {k: v for k, v in RECIPE.items() if k != "model"}
    # a lone student-only overlay is the run's model.student; a separate overlay leaves the recipe to `-c`
    assert job_config(RECIPE, DistillJob(0, [("student_small", small)]))["model"]["student"]["init_args"][
        "model_args"]["embed_dim"] == 80
    assert job_config(RECIPE, DistillJob(0, [("x", {"trainer": {}})], separate_overlay={"trainer": {}})) == RECIPE


def test_member_metrics_are_each_students_own_per_teacher_keys():
    metrics = {"val/loss": 3.0, "val/clip/dense_cos": 0.9, "val/sam/dense_cos": 0.8,
               "val/student_small/clip/dense_cos": 0.7, "val/student_small/sam/dense_cos": 0.6}
    job = DistillJob(0, [("student", None), ("student_small", {})])
    teachers = {"clip", "dino", "sam"}
    assert member_metrics(metrics, job, 0, teachers) == {"val/clip/dense_cos": 0.9, "val/sam/dense_cos": 0.8}
    assert member_metrics(metrics, job, 1, teachers) == {"val/clip/dense_cos": 0.7, "val/sam/dense_cos": 0.6}
    assert member_metrics({"val/loss": 1.0}, DistillJob(0, [("student", None)]), 0, teachers) == {"val/loss": 1.0}
