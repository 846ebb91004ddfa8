"""Data sources and batching: LLaVA JSON bad input, padding, webdataset shards, toy world (tests/test_mllm_data.py)."""

import io
import json
import tarfile

import pytest
import torch

from distill.toy.lm import build_toy_tokenizer
from mllm.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID
from mllm.data import LlavaJsonSource, SampleEncoder, ToySource, WebDataSource, collate, load_llava_json
from tiny_llava import TINY_TEXTS, tiny_image, tiny_llava_records, write_llava_json


@pytest.fixture(scope="module")
def encoder():
    return SampleEncoder(build_toy_tokenizer(TINY_TEXTS), num_image_tokens=4, max_length=64, image_size=16)


def test_bad_records_are_skipped_and_counted(tmp_path):
    records = tiny_llava_records(tmp_path, count=4)
    records[1]["image"] = "missing.png"
    records[2]["conversations"][0]["value"] = "no placeholder here"
    records.append({"id": "text", "conversations": [{"from": "human", "value": "<image> but no image"},
                                                     {"from": "gpt", "value": "x"}]})
    records.append("not a dict")
    kept, skipped = load_llava_json(write_llava_json(records, tmp_path / "data.json"), tmp_path)
    assert [r["id"] for r in kept] == ["0", "3"]
    assert skipped == {"missing image": 1, "placeholder mismatch": 2, "malformed record": 1}


def test_malformed_json_names_file_and_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"id": "0", "conversations": []},\n {"id": ')
    with pytest.raises(ValueError, match=r"broken.json: malformed JSON at line 2"):
        load_llava_json(path, tmp_path)
    bad = write_llava_json([{"id": "0", "image": "x.png", "conversations": []}], tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"bad.json record 0: placeholder mismatch"):
        load_llava_json(bad, tmp_path)


def test_collate_pads_right_or_left_and_drops_bad_samples(tmp_path, encoder):
    source = LlavaJsonSource(str(write_llava_json(tiny_llava_records(tmp_path, 3), tmp_path / "d.json")), str(tmp_path))
    dataset = source.dataset(encoder)
    text_only = encoder({"conversations": [{"from": "human", "value": "what color?"}, {"from": "gpt", "value": "red"}]}, None)
    samples = [dataset[0], None, text_only]
    batch = collate(samples, pad_token_id=0)
    assert batch["num_skipped"] == 1 and batch["images"].shape == (1, 3, 16, 16)
    n0, n1 = len(samples[0]["input_ids"]), len(text_only["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, n1))
    assert batch["attention_mask"][1].tolist() == [1] * n1 + [0] * (max(n0, n1) - n1)
    assert (batch["labels"][1, n1:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0] == IMAGE_TOKEN_ID).sum() == 4
    left = collate(samples, pad_token_id=0, padding_side="left")
    assert left["attention_mask"][1].tolist() == [0] * (max(n0, n1) - n1) + [1] * n1


def test_too_long_conversation_is_skipped(tmp_path):
    tight = SampleEncoder(build_toy_tokenizer(TINY_TEXTS), num_image_tokens=40, max_length=20, image_size=16)
    record = tiny_llava_records(tmp_path, 1)[0]
    with pytest.warns(UserWarning, match="beyond max_length"):
        assert tight(record, tiny_image(0)) is None
    assert tight.skipped["ConversationError"] == 1


def test_webdataset_shards(tmp_path, encoder):
    shard = tmp_path / "000000.tar"
    with tarfile.open(shard, "w") as tar:
        for index, record in enumerate(tiny_llava_records(tmp_path / "img", 3)):
            image = io.BytesIO()
            tiny_image(index).save(image, format="PNG")
            for name, data in ((f"{index:04d}.png", image.getvalue()), (f"{index:04d}.json", json.dumps(record).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    source = WebDataSource(str(shard), shuffle_buffer=0)
    samples = list(source.dataset(encoder))
    assert len(samples) == 3 and samples[0]["image"].shape == (3, 16, 16)
    assert torch.allclose(samples[0]["image"][:, 0, 0], torch.tensor([220, 30, 30]) / 255)
    items = source.eval_items()
    assert [i.answer for i in items] == ["red", "green", "blue"]


def test_toy_source_records():
    align = ToySource(seed=0, num_images=2, stage="align")
    sample = align.world[0]
    assert align.record(0)["conversations"][1]["value"] == sample.caption
    finetune = ToySource(seed=0, num_images=2, stage="finetune")
    turns = finetune.record(0)["conversations"]
    # per object its colour/texture/size questions or its fusion/size questions
    assert 2 * len(sample.objects) <= len(turns) // 2 <= 3 * len(sample.objects)
    assert turns[0]["value"].startswith("<image>\n") and not any("<image>" in t["value"] for t in turns[1:])
    items = finetune.eval_items()
    assert len(items) == sum(len(finetune.world[i].qa) for i in range(2))
    assert items[0].load_image().size == (64, 64)


def test_toy_finetune_records_shuffle_question_order_and_ask_anew():
    from mllm.data import ToySource

    source = ToySource(seed=0, num_images=30, stage="finetune", records_per_image=2)
    first_kinds, renewed = set(), 0
    for index in range(30):
        record = source.record(index)
        humans = [t["value"].replace("<image>\n", "") for t in record["conversations"] if t["from"] == "human"]
        asked = {qa.question: qa.answer for qa in source.world[index].qa}
        kinds = {qa.question: qa.kind for qa in source.world[index].qa}
        answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
        assert [asked[h] for h in humans] == answers  # every question is the image's, with its answer
        assert source.record(index) == record  # deterministic
        first_kinds.add(kinds[humans[0]])
        renewed += source.record(index + 30)["conversations"] != record["conversations"]  # same image, asked anew
    assert len(first_kinds) > 2 and renewed > 5
    assert len(source.dataset(lambda r, v: r)) == 60


def test_toy_questions_per_record_limits_turns():
    from mllm.data import ToySource

    full = ToySource(seed=0, num_images=20, stage="finetune")
    single = ToySource(seed=0, num_images=20, stage="finetune", questions_per_record=1)
    for index in range(20):
        turns = single.record(index)["conversations"]
        assert len(turns) == 2 and turns[0]["value"].startswith("<image>\n")
        # the one question is the first of the full record's shuffled order, with its answer
        assert turns == full.record(index)["conversations"][:2]
    with pytest.raises(ValueError, match="questions_per_record"):
        ToySource(stage="finetune", questions_per_record=0)


def test_toy_dataset_sample_matches_record_and_image():
    from torchvision.transforms.functional import to_tensor

    from distill.toy.world import world_texts

    source = ToySource(seed=0, num_images=3, stage="finetune", questions_per_record=2)
    tokenizer = build_toy_tokenizer(world_texts(source.world, 3))
    encode = SampleEncoder(tokenizer, num_image_tokens=4, max_length=128, image_size=64)
    dataset = source.dataset(encode)
    for index in range(3):
        expected = encode(source.record(index), source.world[index].image)
        sample = dataset[index]
        assert torch.equal(sample["input_ids"], expected["input_ids"])
        assert torch.equal(sample["labels"], expected["labels"])
        assert torch.equal(sample["image"], expected["image"])
    items = source.eval_items()
    assert len(items) == sum(len(source.world[i].qa) for i in range(3))
    assert all(torch.equal(to_tensor(item.load_image()), to_tensor(source.world[0].image))
               for item in items[: len(source.world[0].qa)])
