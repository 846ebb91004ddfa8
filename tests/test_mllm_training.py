"""Both LLaVA stages train (loss drops, the right parts change), checkpoints chain, CLI fit + evaluate
(tests/test_mllm_training.py)."""

import pytest
import torch
import yaml

from distill.encoders import TimmEncoder
from tiny_teachers import write_timm_dir
from mllm.cli import make_cli
from mllm.data import LlavaJsonSource, SampleEncoder, collate
from mllm.evaluate import evaluate_checkpoint
from mllm.loading import load_tokenizer
from mllm.module import LlavaModule, LoraOptions
from tiny_llava import tiny_llava_records, write_llava_json, write_tiny_lm
from mllm.towers import SingleEncoderTower
from llava_configs import cli_trainer, timm_tower


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    lm = write_tiny_lm(tmp / "lm", steps=10)
    vit = write_timm_dir(tmp / "vit")
    data = {stage: write_llava_json(tiny_llava_records(tmp / "img", 8, stage), tmp / f"{stage}.json")
            for stage in ("align", "finetune")}
    return {"tmp": tmp, "lm": str(lm), "vit": str(vit), "data": data}


def tower(setup):
    return SingleEncoderTower(TimmEncoder(f"local-dir:{setup['vit']}", pretrained=True, layer=-2))


def batch(setup, module, stage):
    encode = SampleEncoder(load_tokenizer(setup["lm"]), module.model.tower.num_tokens, 64, 32)
    dataset = LlavaJsonSource(str(setup["data"][stage]), str(setup["tmp"] / "img")).dataset(encode)
    return collate([dataset[i] for i in range(len(dataset))], pad_token_id=0)


def train(module, data, steps):
    optimizer = torch.optim.AdamW(module.parameter_groups())
    losses = []
    for _ in range(steps):
        loss = module(data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_align_trains_only_the_projector_then_finetune_from_it(setup):
    torch.manual_seed(0)
    align = LlavaModule(tower(setup), lm=setup["lm"], stage="align", projector_lr=1e-2)
    assert align.trained_parameter_names() == {n for n, _ in align.named_parameters() if n.startswith("model.projector.")}
    lm_before = {k: v.clone() for k, v in align.model.lm.state_dict().items()}
    losses = train(align, batch(setup, align, "align"), 20)
    assert losses[-1] < 0.85 * losses[0]
    assert all(torch.equal(v, align.model.lm.state_dict()[k]) for k, v in lm_before.items())
    ckpt = setup["tmp"] / "align.ckpt"
    state = {k: v for k, v in align.state_dict().items() if k in align.trained_parameter_names()}
    torch.save({"state_dict": state}, ckpt)

    finetune = LlavaModule(tower(setup), lm=setup["lm"], stage="finetune", init_from=str(ckpt), lm_lr=1e-3)
    assert torch.equal(finetune.model.projector[0].weight, align.model.projector[0].weight)
    assert any(n.startswith("model.lm.") for n in finetune.trained_parameter_names())
    assert [g["lr"] for g in finetune.parameter_groups()] == [1e-3, 1e-3]
    losses = train(finetune, batch(setup, finetune, "finetune"), 15)
    assert losses[-1] < 0.8 * losses[0]


def test_lora_finetune_trains_adapters_only(setup):
    torch.manual_seed(0)
    module = LlavaModule(tower(setup), lm=setup["lm"], stage="finetune", lora=LoraOptions(r=4, alpha=8, dropout=0.0),
                         lm_lr=1e-2)
    lm_trained = [n for n in module.trained_parameter_names() if n.startswith("model.lm.")]
    assert lm_trained and all("lora_" in n for n in lm_trained)
    losses = train(module, batch(setup, module, "finetune"), 10)
    assert losses[-1] < losses[0]


def test_projector_from_another_tower_is_rejected(setup):
    ckpt = setup["tmp"] / "wide.ckpt"
    torch.save({"state_dict": {"model.projector.0.weight": torch.zeros(128, 999)}}, ckpt)
    with pytest.raises(ValueError, match="projector's input width"):
        LlavaModule(tower(setup), lm=setup["lm"], stage="finetune", init_from=str(ckpt))


def test_cli_fit_then_evaluate(setup):
    tmp = setup["tmp"]
    config = {
        "trainer": cli_trainer(tmp / "run", 3, "align"),
        "model": {"tower": timm_tower(setup["vit"]),
                  "lm": setup["lm"], "stage": "align"},
        "data": {"train": {"class_path": "mllm.data.LlavaJsonSource",
                           "init_args": {"json_path": str(setup["data"]["align"]), "image_folder": str(tmp / "img")}},
                 "batch_size": 4, "image_size": 32, "max_length": 64},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    make_cli(["fit", "-c", str(path)])
    ckpt = tmp / "run" / "align.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["state_dict"] and all(k.startswith("model.projector.") for k in saved["state_dict"])
    source = LlavaJsonSource(str(setup["data"]["finetune"]), str(tmp / "img"))
    result = evaluate_checkpoint(str(ckpt), source, image_size=32, max_new_tokens=3, out_json=str(tmp / "eval.json"))
    assert result["overall"]["count"] == 8 and set(result["by_kind"]) == {"color"}
    assert (tmp / "eval.json").is_file()
