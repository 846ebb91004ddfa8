"""Study configs parse (types checked), and the runner builds per-variant configs that the mllm CLI accepts."""

from pathlib import Path

import pytest
import yaml

from mllm.study.config import load_study, with_budget
from mllm.study.runner import config_key, eval_metrics, stage_config, variant_tower

ROOT = Path(__file__).parents[1]
STUDIES = sorted((ROOT / "configs" / "study").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_study_config_parses(path):
    study = load_study(path)
    kinds = {v.kind for v in study.variants}
    assert kinds == {"single", "ensemble", "student"}
    for recipe in (study.align_recipe, study.finetune_recipe, study.distill_recipe):
        assert (ROOT / recipe).is_file(), recipe


def test_toy_study_matches_the_issue():
    study = load_study(ROOT / "configs/study/toy.yaml")
    assert [v.name for v in study.variants] == ["clip", "dino", "sam", "ensemble_all", "ensemble_clip_dino", "student"]
    assert with_budget(study, smoke=False).seeds == 3 and with_budget(study, smoke=True).seeds == 1
    assert with_budget(study, smoke=False, seeds=2).seeds == 2


def test_bad_study_config_names_the_problem(tmp_path):
    text = (ROOT / "configs/study/toy.yaml").read_text().replace("kind: single", "kind: solo", 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError, match="variant 'clip' has kind 'solo'"):
        load_study(bad)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_study(tmp_path / "nope.yaml")


@pytest.mark.parametrize("variant_index", range(6))
def test_variant_stage_configs_parse_with_the_mllm_cli(tmp_path, variant_index):
    from mllm.cli import LlavaCLI
    from mllm.datamodule import LlavaDataModule
    from mllm.module import LlavaModule

    class ParseOnly(LlavaCLI):
        def instantiate_classes(self) -> None:
            pass

    study = load_study(ROOT / "configs/study/toy.yaml")
    variant = study.variants[variant_index]
    tower = variant_tower(variant, study, student=str(tmp_path / "export"))
    assert tower["init_args"]["grid"] == 8
    recipe = yaml.safe_load((ROOT / study.finetune_recipe).read_text())
    cfg = stage_config(recipe, tower, "finetune", seed=2, steps=7, run_dir=tmp_path, study=study)
    assert cfg["seed_everything"] == 2 and cfg["trainer"]["max_steps"] == 7
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = ParseOnly(LlavaModule, LlavaDataModule, run=False, args=["-c", str(path)])
    assert cli.config["trainer"]["max_steps"] == 7


def test_student_variant_needs_a_student():
    study = load_study(ROOT / "configs/study/toy.yaml")
    with pytest.raises(ValueError, match="needs the distilled student"):
        variant_tower(study.variants[-1], study, student=None)


def test_eval_metrics_flattening_and_keys():
    result = {"overall": {"accuracy": 0.5}, "by_kind": {"color": {"accuracy": 0.25},
                                                       "existence": {"accuracy": 0.75, "pope": {"f1": 0.8}}}}
    assert eval_metrics(result) == {"overall": 0.5, "color": 0.25, "existence": 0.75, "existence_f1": 0.8}
    assert config_key({"a": 1}, 2) == config_key({"a": 1}, 2) != config_key({"a": 1}, 3)
