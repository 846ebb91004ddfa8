"""Frozen-feature cache, CachedTower, oracle/blind controls, cached toy records and likelihood scoring."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from distill.toy.lm import build_toy_lm
from distill.toy.world import ATTRIBUTES, ToyWorld, world_texts
from mllm.conversation import IGNORE_INDEX, tokenize_conversation
from mllm.data import SampleEncoder, ToySource
from mllm.features import (
    CachedTower,
    blind_tokens,
    cache_features,
    load_features,
    oracle_tokens,
    write_features,
)
from mllm.loading import load_tokenizer
from mllm.model import LlavaModel
from mllm.scoring import rank_answers


def test_cache_is_computed_once_and_keyed_by_config(tmp_path):
    calls = []

    def tokens():
        calls.append(1)
        return torch.randn(5, 4, 3)

    first = cache_features(tokens, "v", {"a": 1}, seed=0, num_images=5, image_size=64, folder=tmp_path, max_objects=1)
    again = cache_features(tokens, "v", {"a": 1}, seed=0, num_images=5, image_size=64, folder=tmp_path, max_objects=1)
    other = cache_features(tokens, "v", {"a": 2}, seed=0, num_images=5, image_size=64, folder=tmp_path, max_objects=1)
    assert first == again != other and len(calls) == 2
    assert load_features(first, seed=0, image_size=64, num_images=3, max_objects=1).shape == (3, 4, 3)
    with pytest.raises(ValueError, match=r"v-seed0-5-.*hold 5 images.*\(1000, 64, 1\)"):
        load_features(first, seed=1000, image_size=64, num_images=3, max_objects=1)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        CachedTower(str(tmp_path / "missing.safetensors"))


def test_cached_tower_standardizes_with_the_files_statistics(tmp_path):
    tokens = torch.randn(50, 4, 3) * torch.tensor([1.0, 10.0, 100.0]) + torch.tensor([5.0, -3.0, 0.0])
    path = write_features(tokens, tmp_path / "f.safetensors", {"seed": 0, "image_size": 64})
    tower = CachedTower(str(path))
    assert (tower.dim, tower.num_tokens) == (3, 4)
    out = tower(tokens)
    flat = out.reshape(-1, 3).double()
    assert torch.allclose(flat.mean(0), torch.zeros(3, dtype=torch.double), atol=1e-5)
    assert torch.allclose(flat.std(0), torch.ones(3, dtype=torch.double), atol=1e-4)
    assert torch.equal(CachedTower(str(path), standardize=False)(tokens), tokens)
    with pytest.raises(ValueError, match=r"expects cached tokens \[B, 4, 3\]"):
        tower(torch.zeros(2, 5, 3))


def test_cached_tower_whitening_decorrelates_the_channels(tmp_path):
    torch.manual_seed(0)
    mixing = torch.tensor([[3.0, 2.0, 0.0], [0.0, 1.5, 0.0], [0.0, 0.0, 0.05]])  # channels 0 and 1 correlate (0.8)
    tokens = torch.randn(400, 4, 3) @ mixing + torch.tensor([5.0, -3.0, 0.0])
    path = write_features(tokens, tmp_path / "f.safetensors", {"seed": 0, "image_size": 64})
    flat = CachedTower(str(path), whiten=True)(tokens).reshape(-1, 3).double()
    assert torch.allclose(flat.mean(0), torch.zeros(3, dtype=torch.double), atol=1e-4)
    assert torch.allclose(torch.cov(flat.T), torch.eye(3, dtype=torch.double), atol=0.06)
    plain = torch.corrcoef(CachedTower(str(path))(tokens).reshape(-1, 3).T.double())
    assert plain[0, 1] > 0.7  # per-channel standardization alone leaves them correlated
    blind = write_features(torch.zeros(5, 4, 3), tmp_path / "b.safetensors", {"seed": 0, "image_size": 64})
    assert torch.equal(CachedTower(str(blind), whiten=True)(torch.zeros(2, 4, 3)), torch.zeros(2, 4, 3))


def test_oracle_tokens_hold_the_ground_truth_of_each_quadrant():
    world = ToyWorld(seed=0, max_objects=2)
    tokens = oracle_tokens(0, 6, 64, grid=2, max_objects=2)
    width = 5 + sum(len(classes) for classes in ATTRIBUTES.values())
    assert width == 5 + 4 + 6 + 4 + 3
    assert tokens.shape == (6, 4, width) and set(tokens.unique().tolist()) <= {0.0, 1.0}
    for index in range(6):
        sample = world[index]
        for quadrant in range(4):
            cell = tokens[index, quadrant]
            assert cell[quadrant] == 1 and cell[:4].sum() == 1  # where the cell is
            objects = [o for o in sample.objects if o.quadrant == quadrant]
            assert cell[4] == len(objects)
            if objects:
                obj, offset = objects[0], 5
                for name, classes in ATTRIBUTES.items():  # one-hot per attribute, in ATTRIBUTES order
                    block = cell[offset:offset + len(classes)]
                    assert block.sum() == 1 and block[classes.index(getattr(obj, name))] == 1
                    offset += len(classes)
            else:
                assert cell[4:].sum() == 0
    assert torch.equal(blind_tokens(3, 2), torch.zeros(3, 4, 16))


def test_toy_source_with_features_carries_the_cached_tokens(tmp_path):
    tokens = torch.randn(4, 4, 8)
    path = write_features(tokens, tmp_path / "f.safetensors", {"seed": 0, "image_size": 64, "max_objects": 1})
    source = ToySource(seed=0, num_images=4, stage="finetune", records_per_image=3, features=str(path), max_objects=1)
    record, visual = source.record_and_image(6)
    assert torch.equal(visual, tokens[6 % 4]) and record["image"] == 2
    assert len(source.dataset(lambda r, v: (r, v))) == 12
    items = ToySource(seed=0, num_images=4, stage="finetune", features=str(path), max_objects=1).eval_items()
    assert len(items) == 16 and [i.image_id for i in items[:5]] == [0, 0, 0, 0, 1]
    assert torch.equal(items[4].load_image(), tokens[1])
    with pytest.raises(ValueError, match="seed, size, max_objects"):
        _ = ToySource(seed=0, num_images=4, stage="finetune", features=str(path), max_objects=4).features


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    lm_dir = build_toy_lm(world_texts(ToyWorld(0, max_objects=1), 60), folder / "lm", steps=3)
    tokens = torch.randn(6, 4, 8)
    path = write_features(tokens, folder / "f.safetensors", {"seed": 1000, "image_size": 64, "max_objects": 1})
    torch.manual_seed(0)
    model = LlavaModel(CachedTower(str(path)), AutoModelForCausalLM.from_pretrained(lm_dir), "mlp2x_gelu")
    return model, load_tokenizer(str(lm_dir)), str(path)


def test_memoized_encoder_equals_direct_tokenization(tiny_llava):
    _, tokenizer, _ = tiny_llava
    encode = SampleEncoder(tokenizer, 4, 128, 64)
    record = ToySource(seed=0, num_images=3, stage="finetune", max_objects=1).record(1)
    direct = tokenize_conversation(record["conversations"], tokenizer, 4, 128, num_images=1)
    for _ in range(2):  # the second call is served from the memo
        sample = encode(record, torch.zeros(4, 8))
        assert sample["input_ids"].tolist() == direct[0] and sample["labels"].tolist() == direct[1]


def test_rank_answers_picks_the_highest_likelihood_option(tiny_llava):
    model, tokenizer, path = tiny_llava
    items = ToySource(seed=1000, num_images=3, stage="finetune", features=path, max_objects=1).eval_items()
    predictions = rank_answers(model, tokenizer, items, batch_size=7)
    for item, prediction in zip(items, predictions):
        scores = []
        for option in item.options:
            ids, labels = tokenize_conversation([{"from": "human", "value": "<image>\n" + item.question},
                                                 {"from": "gpt", "value": option}], tokenizer, 4, 512, num_images=1)
            ids, labels = torch.tensor([ids]), torch.tensor([labels])
            with torch.no_grad():
                logits = model(ids, torch.ones_like(ids), item.load_image()[None]).logits
            logp = F.log_softmax(logits[0, :-1], -1)
            target = labels[0, 1:]
            keep = target != IGNORE_INDEX
            scores.append(float(logp[keep].gather(1, target[keep, None]).sum()))
        assert prediction == item.options[int(np.argmax(scores))]
    with pytest.raises(ValueError, match="needs candidate answers"):
        rank_answers(model, tokenizer, [items[0].__class__("q?", "a", "k", None, lambda: None)])


def test_rank_answers_tokenizes_each_question_and_option_once(tiny_llava, monkeypatch):
    import mllm.scoring

    model, tokenizer, path = tiny_llava
    items = ToySource(seed=1000, num_images=6, stage="finetune", features=path, max_objects=1).eval_items()
    expected = rank_answers(model, tokenizer, items, batch_size=7)
    calls = []

    def counted(turns, *args, **kwargs):
        calls.append((turns[0]["value"], turns[1]["value"]))
        return tokenize_conversation(turns, *args, **kwargs)

    monkeypatch.setattr(mllm.scoring, "tokenize_conversation", counted)
    assert rank_answers(model, tokenizer, items, batch_size=7) == expected
    pairs = {(f"<image>\n{i.question}", option) for i in items for option in i.options}
    assert len(calls) == len(set(calls)) == len(pairs) < sum(len(i.options) for i in items)


def test_rank_answers_runs_the_tower_once_per_question(tiny_llava, monkeypatch):
    model, tokenizer, path = tiny_llava
    items = ToySource(seed=1000, num_images=3, stage="finetune", features=path, max_objects=1).eval_items()
    seen = []
    forward = model.tower.forward
    monkeypatch.setattr(model.tower, "forward", lambda images: seen.append(len(images)) or forward(images))
    rank_answers(model, tokenizer, items, batch_size=7)
    assert sum(seen) == len(items) < sum(len(i.options) for i in items)  # not once per candidate


def test_rank_answers_honours_the_tokenizers_padding_side_and_pad_token(tiny_llava, monkeypatch):
    import copy

    model, tokenizer, path = tiny_llava
    items = ToySource(seed=1000, num_images=3, stage="finetune", features=path, max_objects=1).eval_items()
    right, right_scores = rank_answers(model, tokenizer, items, batch_size=7, return_scores=True)
    left_tokenizer = copy.deepcopy(tokenizer)
    left_tokenizer.padding_side = "left"
    left_tokenizer.pad_token = left_tokenizer.eos_token  # another pad id: masked out, so it must not matter
    padded = []
    lm_forward = model.lm.forward

    def record(*args, **kwargs):
        padded.append((kwargs["attention_mask"][:, 0] == 0).any().item())  # a row starting with padding
        return lm_forward(*args, **kwargs)

    monkeypatch.setattr(model.lm, "forward", record)
    left, left_scores = rank_answers(model, left_tokenizer, items, batch_size=7, return_scores=True)
    assert any(padded)  # rows really were left-padded
    assert left == right
    np.testing.assert_allclose(np.concatenate(left_scores), np.concatenate(right_scores), atol=1e-4)
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        rank_answers(model, no_pad, items[:1])
