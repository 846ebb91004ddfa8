"""`unitower llava evaluate` on LLaVA JSON as a new user meets it: missing / corrupt images are errors naming the
record unless --skip-missing (counted), `--score rank` with candidates from the data, and `--out` with every
question's prediction and score (tests/test_mllm_evaluate.py)."""

import json

import pytest
import yaml

from llava_configs import cli_trainer, timm_tower
from mllm.cli import main, make_cli
from mllm.data import LlavaJsonSource
from mllm.evaluate import evaluate_checkpoint
from tiny_llava import tiny_llava_records, write_llava_json, write_tiny_lm
from tiny_teachers import write_timm_dir

COUNT = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step finetune run on 8 tiny colour questions, and its JSON; record 3's image is deleted, record 5's
    is replaced by bytes that are no PNG."""
    tmp = tmp_path_factory.mktemp("evaluate")
    lm, vit = write_tiny_lm(tmp / "lm", steps=10), write_timm_dir(tmp / "vit")
    records = tiny_llava_records(tmp / "img", COUNT, "finetune")
    data = write_llava_json(records, tmp / "finetune.json")
    config = {
        "trainer": cli_trainer(tmp / "run", 2, "finetune"),
        "model": {"tower": timm_tower(vit), "lm": str(lm), "stage": "finetune", "init_from": None},
        "data": {"train": {"class_path": "mllm.data.LlavaJsonSource",
                           "init_args": {"json_path": str(data), "image_folder": str(tmp / "img")}},
                 "batch_size": 4, "image_size": 32, "max_length": 96},
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    make_cli(["fit", "-c", str(tmp / "config.yaml")])
    (tmp / "img" / "3.png").unlink()
    (tmp / "img" / "5.png").write_bytes(b"not a png at all")
    with_candidates = [{**r, "candidates": ["red", "blue"]} for r in records]
    return {"ckpt": str(tmp / "run" / "finetune.ckpt"), "json": str(data), "images": str(tmp / "img"), "tmp": tmp,
            "candidates_json": str(write_llava_json(with_candidates, tmp / "candidates.json"))}


def test_missing_and_corrupt_images_are_errors_naming_the_record(trained):
    with pytest.warns(UserWarning, match="missing image"):  # the load warning: training skips it
        source = LlavaJsonSource(trained["json"], trained["images"])
    with pytest.raises(ValueError) as error:
        evaluate_checkpoint(trained["ckpt"], source, max_new_tokens=2)
    message = str(error.value)
    assert message.startswith("2 of 8 evaluation questions have an unusable image")
    assert "record 3 (id 3) image" in message and "3.png: missing file" in message
    assert "record 5 (id 5) image" in message and "5.png: undecodable image" in message
    assert "--skip-missing" in message


def test_skip_missing_scores_the_rest_and_counts_them(trained):
    source = LlavaJsonSource(trained["json"], trained["images"])
    result = evaluate_checkpoint(trained["ckpt"], source, max_new_tokens=2, skip_missing=True)
    assert result["overall"]["count"] == COUNT - 2 and result["skipped"]["count"] == 2
    assert [r.split(":")[0].rsplit("record ", 1)[1] for r in result["skipped"]["records"]] == [
        f"3 (id 3) image {trained['images']}/3.png", f"5 (id 5) image {trained['images']}/5.png"]
    assert [q["where"].split(" record ")[1].split(" ")[0] for q in result["questions"]] == ["0", "1", "2", "4", "6", "7"]


def test_out_writes_every_question_json_and_jsonl(trained, capsys):
    common = ["evaluate", "--ckpt", trained["ckpt"], "--json", trained["json"], "--image-folder", trained["images"],
              "--max-new-tokens", "2", "--skip-missing"]
    out = trained["tmp"] / "eval.json"
    main(common + ["--out", str(out)])
    assert f"scored {COUNT - 2} questions, skipped 2" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert len(saved["questions"]) == COUNT - 2 and saved["skipped"]["count"] == 2
    first = saved["questions"][0]
    assert set(first) >= {"index", "where", "question", "answer", "prediction", "correct", "kind"}
    assert first["answer"] == "red" and first["correct"] in (0.0, 1.0)
    assert sum(q["correct"] for q in saved["questions"]) / len(saved["questions"]) == saved["overall"]["accuracy"]
    lines = trained["tmp"] / "eval.jsonl"
    main(common + ["--out", str(lines)])
    rows = [json.loads(line) for line in lines.read_text().splitlines()]
    assert rows == saved["questions"]
    assert json.loads((trained["tmp"] / "eval.summary.json").read_text())["overall"] == saved["overall"]


def test_rank_scores_the_vocabulary_or_the_records_candidates(trained):
    source = LlavaJsonSource(trained["json"], trained["images"])
    result = evaluate_checkpoint(trained["ckpt"], source, skip_missing=True, score_mode="rank")
    vocabulary = {"red", "green", "blue", "yellow"}  # every reference answer of the file (records 3, 5 included)
    assert result["score_mode"] == "rank" and {q["prediction"] for q in result["questions"]} <= vocabulary
    assert all(q["log_likelihood"] < 0 for q in result["questions"])
    assert [q["correct"] for q in result["questions"]] == [float(q["prediction"] == q["answer"])
                                                           for q in result["questions"]]
    own = LlavaJsonSource(trained["candidates_json"], trained["images"])
    result = evaluate_checkpoint(trained["ckpt"], own, skip_missing=True, score_mode="rank")
    assert {q["prediction"] for q in result["questions"]} <= {"red", "blue"}
