"""Checkpoints carry their data settings and `python -m mllm evaluate` uses them unless a flag overrides
(tests/test_llava15_eval_settings.py)."""

import pytest
import torch
import yaml

import mllm.generate
from tiny_teachers import write_timm_dir
from mllm.cli import main, make_cli
from mllm.data import LlavaJsonSource
from mllm.evaluate import evaluate_checkpoint
from tiny_llava import tiny_llava_records, write_llava_json, write_tiny_lm
from llava_configs import cli_trainer, timm_tower


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step align run at image size 32 with padding, a custom pad colour and a system prompt."""
    tmp = tmp_path_factory.mktemp("settings")
    lm, vit = write_tiny_lm(tmp / "lm", steps=10), write_timm_dir(tmp / "vit")
    data = write_llava_json(tiny_llava_records(tmp / "img", 8, "finetune"), tmp / "finetune.json")
    config = {
        "trainer": cli_trainer(tmp / "run", 2, "align"),
        "model": {"tower": timm_tower(vit),
                  "lm": str(lm), "stage": "align"},
        "data": {"train": {"class_path": "mllm.data.LlavaJsonSource",
                           "init_args": {"json_path": str(data), "image_folder": str(tmp / "img")}},
                 "batch_size": 4, "image_size": 32, "max_length": 96, "pad_to_square": True,
                 "pad_color": [1, 2, 3], "system_prompt": "be brief.", "image_first": True},
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    make_cli(["fit", "-c", str(tmp / "config.yaml")])
    return {"ckpt": str(tmp / "run" / "align.ckpt"), "json": str(data), "images": str(tmp / "img")}


@pytest.fixture
def seen(monkeypatch):
    """The image settings generate_answers prepares evaluation images with."""
    calls = []
    original = mllm.generate.image_to_tensor

    def spy(image, image_size, pad_to_square=False, pad_color=None):
        calls.append((image_size, pad_to_square, None if pad_color is None else tuple(pad_color)))
        return original(image, image_size, pad_to_square, pad_color)

    monkeypatch.setattr(mllm.generate, "image_to_tensor", spy)
    return calls


EXPECTED = {"image_size": 32, "pad_to_square": True, "pad_color": [1, 2, 3], "chat_template": None,
            "system_prompt": "be brief.", "max_length": 96, "image_first": True}


def test_checkpoint_saves_data_settings(trained):
    saved = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    assert saved["data_settings"] == EXPECTED


def test_evaluate_uses_checkpoint_settings_then_flags(trained, seen):
    source = LlavaJsonSource(trained["json"], trained["images"])
    result = evaluate_checkpoint(trained["ckpt"], source, limit=2, max_new_tokens=2)
    assert result["data_settings"] == EXPECTED
    assert set(seen) == {(32, True, (1, 2, 3))}
    seen.clear()
    result = evaluate_checkpoint(trained["ckpt"], source, limit=2, image_size=40, pad_to_square=False, max_new_tokens=2)
    assert set(seen) == {(40, False, (1, 2, 3))} and result["data_settings"]["image_size"] == 40


def test_cli_evaluate_flags_default_to_the_checkpoint(trained, seen, capsys):
    common = ["evaluate", "--ckpt", trained["ckpt"], "--json", trained["json"], "--image-folder", trained["images"],
              "--limit", "2", "--max-new-tokens", "2"]
    main(common)
    assert set(seen) == {(32, True, (1, 2, 3))}
    seen.clear()
    main(common + ["--image-size", "48", "--no-pad-to-square", "--pad-color", "9", "9", "9"])
    assert set(seen) == {(48, False, (9, 9, 9))}
    assert '"image_size": 48' in capsys.readouterr().out
