"""Study configs parse (types checked), and the runner builds per-variant configs that the mllm CLI accepts."""

from pathlib import Path

import pytest
import yaml

from mllm.study.config import load_study, with_budget
from mllm.study.common import config_key, select_variants, variant_tower
from mllm.study.toy import stage_config

ROOT = Path(__file__).parents[1]
STUDIES = sorted((ROOT / "configs" / "study").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_study_config_parses(path):
    study = load_study(path)
    kinds = {v.kind for v in study.variants}
    assert {"single", "ensemble", "student"} <= kinds <= {"single", "ensemble", "student", "control"}
    for recipe in (study.align_recipe, study.finetune_recipe, study.distill_recipe):
        assert (ROOT / recipe).is_file(), recipe


def test_toy_study_has_towers_and_controls():
    study = load_study(ROOT / "configs/study/toy.yaml")
    assert [v.name for v in study.variants] == ["clip", "dino", "sam", "ensemble_all", "ensemble_clip_dino",
                                                "ensemble_mousi", "ensemble_brave", "ensemble_comm", "student",
                                                "student_small", "blind", "oracle"]
    fusions = {v.name: v.tower["init_args"]["fusion"] for v in study.variants if v.kind == "ensemble"}
    assert fusions["ensemble_brave"]["class_path"] == "mllm.fusion.ResamplerFusion"
    assert "num_queries" not in fusions["ensemble_brave"]["init_args"]  # K = grid * grid: the common budget
    assert study.norm == "standardize"
    overlays = {v.name: v.distill_overlay for v in study.variants if v.kind == "student"}
    assert overlays["student"] is None
    assert Path(overlays["student_small"]).resolve() == ROOT / "configs/distill/overlays/toy_small_student.yaml"
    assert [v.control for v in study.variants if v.kind == "control"] == ["blind", "oracle"]
    full = with_budget(study, smoke=False)
    assert full.seeds == 3 and full.eval_images >= 1000 and with_budget(study, smoke=True).seeds == 1
    assert with_budget(study, smoke=False, seeds=2).seeds == 2
    # one feature-layer rule for every tower: the penultimate block, the student's too
    layers = []
    for v in study.variants:
        args = v.tower.get("init_args", {})
        encoders = args.get("encoders") or ([args["encoder"]] if "encoder" in args else [])
        layers += [e["init_args"]["layer"] for e in encoders] + ([args["layer"]] if "layer" in args else [])
    assert len(layers) == 18 and set(layers) == {-2}


def test_bad_study_config_names_the_problem(tmp_path):
    text = (ROOT / "configs/study/toy.yaml").read_text().replace("kind: single", "kind: solo", 1)
    (tmp_path / "towers").symlink_to(ROOT / "configs/towers")  # the study names ../towers/*.yaml
    (tmp_path / "distill").symlink_to(ROOT / "configs/distill")  # and ../distill/overlays/*.yaml
    (tmp_path / "study").mkdir()
    bad = tmp_path / "study" / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError, match="variant 'clip' has kind 'solo'"):
        load_study(bad)
    bad.write_text((ROOT / "configs/study/toy.yaml").read_text().replace("control: oracle", "control: psychic"))
    with pytest.raises(ValueError, match="control variant 'oracle' needs `control`"):
        load_study(bad)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_study(tmp_path / "nope.yaml")
    bad.write_text((ROOT / "configs/study/toy.yaml").read_text().replace("overlays/toy_small_student", "overlays/tiny"))
    with pytest.raises(FileNotFoundError, match=r"variant 'student_small' distill_overlay '../distill/overlays/tiny.yaml'"):
        load_study(bad)
    bad.write_text((ROOT / "configs/study/toy.yaml").read_text().replace(
        "  - {name: clip, kind: single, tower: ../towers/toy_clip.yaml}",
        "  - {name: clip, kind: single, tower: ../towers/toy_clip.yaml, distill_overlay: ../distill/overlays/toy_small_student.yaml}"))
    with pytest.raises(ValueError, match="variant 'clip' has a distill_overlay but kind 'single'"):
        load_study(bad)
    bad.write_text((ROOT / "configs/study/toy.yaml").read_text().replace("towers/toy_sam.yaml", "towers/toy_sma.yaml"))
    with pytest.raises(FileNotFoundError, match=r"variant 'sam': tower file '../towers/toy_sma.yaml'"):
        load_study(bad)


def test_study_variants_read_the_tower_files():
    study = load_study(ROOT / "configs/study/toy.yaml")
    for variant in study.variants:
        if variant.kind in ("single", "ensemble"):
            assert variant.tower == yaml.safe_load((ROOT / f"configs/towers/toy_{variant.name}.yaml").read_text())


def test_unknown_variant_in_only_is_an_error():
    study = load_study(ROOT / "configs/study/toy.yaml")
    assert [v.name for v in select_variants(study, ["oracle", "clip"])] == ["clip", "oracle"]
    with pytest.raises(ValueError, match=r"--only clipp: unknown variant\(s\).*'ensemble_all'"):
        select_variants(study, ["clipp"])


@pytest.mark.parametrize("stage", ["align", "finetune"])
def test_cached_stage_configs_parse_with_the_mllm_cli(tmp_path, stage):
    from mllm.cli import LlavaCLI
    from mllm.datamodule import LlavaDataModule
    from mllm.module import LlavaModule

    class ParseOnly(LlavaCLI):
        def instantiate_classes(self) -> None:
            pass

    study = load_study(ROOT / "configs/study/toy.yaml")
    budget = with_budget(study, smoke=False)
    recipe = yaml.safe_load((ROOT / (study.align_recipe if stage == "align" else study.finetune_recipe)).read_text())
    brave = variant_tower(next(v for v in study.variants if v.name == "ensemble_brave"), study, None)
    cfg = stage_config(recipe, stage, seed=2, steps=7, run_dir=tmp_path, features="/feat.safetensors", study=study,
                       budget=budget, tower=brave)
    assert cfg["seed_everything"] == 2 and cfg["trainer"]["max_steps"] == 7
    assert cfg["model"]["tower"] == {"class_path": "mllm.features.CachedTower", "init_args": {
        "features": "/feat.safetensors", "fusion": brave["init_args"]["fusion"], "grid": 2, "norm": "standardize"}}
    train = cfg["data"]["train"]["init_args"]
    assert train["features"] == "/feat.safetensors" and train["max_objects"] == study.max_objects
    assert train["num_images"] == budget.train_images and cfg["data"]["val"] is None
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = ParseOnly(LlavaModule, LlavaDataModule, run=False, args=["-c", str(path)])
    assert cli.config["trainer"]["max_steps"] == 7


def test_variant_towers_get_the_common_grid_and_the_student():
    study = load_study(ROOT / "configs/study/toy.yaml")
    student = next(v for v in study.variants if v.kind == "student")
    tower = variant_tower(student, study, student="/exports/s0")
    assert tower["init_args"]["path"] == "/exports/s0" and tower["init_args"]["grid"] == study.grid
    with pytest.raises(ValueError, match="needs the distilled student"):
        variant_tower(student, study, student=None)
    assert config_key({"a": 1}, 2) == config_key({"a": 1}, 2) != config_key({"a": 1}, 3)


def test_study_skill_settings_parse():
    from distill.toy.world import QA_KINDS

    toy = load_study(ROOT / "configs/study/toy.yaml")
    singles = {v.name for v in toy.variants if v.kind == "single"}
    assert toy.owners and set(toy.owners.values()) <= singles and set(toy.owners) <= set(QA_KINDS)
    assert set(toy.fusion_kinds) <= set(QA_KINDS) and toy.fusion_kinds
    assert set(toy.probe_controls.untrained) == singles and toy.probe_controls.pixels is True
    assert (toy.gates.skill_over_untrained, toy.gates.skill_over_pixels, toy.gates.skill_over_others,
            toy.gates.reader_min_ratio) == (0.20, 0.20, 0.15, 0.9)
    real = load_study(ROOT / "configs/study/llava15.yaml")  # real scale: no probes, so no probe controls
    assert real.probe_controls.untrained == [] and real.probe_controls.pixels is False


def test_bad_skill_settings_name_the_key(tmp_path):
    (tmp_path / "towers").symlink_to(ROOT / "configs/towers")
    (tmp_path / "distill").symlink_to(ROOT / "configs/distill")
    (tmp_path / "study").mkdir()
    bad = tmp_path / "study" / "bad.yaml"
    text = (ROOT / "configs/study/toy.yaml").read_text()
    bad.write_text(text.replace("texture: dino", "texture: ensemble_all"))
    with pytest.raises(ValueError, match="owners.texture is 'ensemble_all', which is not a single variant"):
        load_study(bad)
    bad.write_text(text.replace("texture: dino", "smell: dino"))
    with pytest.raises(ValueError, match=r"owners names question kind\(s\) \['smell'\] that the toy world does not ask"):
        load_study(bad)
    bad.write_text(text.replace("untrained: [clip, dino, sam]", "untrained: [clip, student]"))
    with pytest.raises(ValueError, match="probe_controls.untrained names 'student'"):
        load_study(bad)
    bad.write_text(text.replace("fusion_kinds: [fusion]", "fusion_kinds: [fusoin]"))
    with pytest.raises(ValueError, match=r"fusion_kinds names question kind\(s\) \['fusoin'\]"):
        load_study(bad)
