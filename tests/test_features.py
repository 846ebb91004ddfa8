"""Frozen-feature cache, CachedTower, oracle/blind controls, cached toy records and likelihood scoring."""

import copy

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
    features_info,
    grid_tokens,
    load_features,
    split_features,
    oracle_tokens,
    write_features,
)
from mllm.fusion import ResamplerFusion
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
    assert load_features(first, seed=0, image_size=64, num_images=3, max_objects=1).shape == (3, 4 * 3)  # one row per image
    with pytest.raises(ValueError, match=r"v-seed0-5-.*hold 5 images.*\(1000, 64, 1\)"):
        load_features(first, seed=1000, image_size=64, num_images=3, max_objects=1)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        CachedTower(str(tmp_path / "missing.safetensors"))


def test_cache_rows_split_back_into_each_encoders_layers(tmp_path):
    clip, dino = torch.randn(5, 3, 4, 2), torch.randn(5, 1, 9, 6)  # [images, layers, tokens, channels]
    path = write_features([clip, dino], tmp_path / "f.safetensors", {"seed": 0, "image_size": 64})
    info = features_info(path)
    assert info["parts"] == [{"layers": 3, "tokens": 4, "dim": 2}, {"layers": 1, "tokens": 9, "dim": 6}]
    rows = load_features(path, seed=0, image_size=64, num_images=5)
    assert rows.shape == (5, 3 * 4 * 2 + 9 * 6)
    back = split_features(rows, info["parts"])
    assert torch.equal(back[0], clip) and torch.equal(back[1], dino)
    # the probes' view: each part's last layer on a 2x2 grid, channels concatenated (dino's 3x3 map pooled)
    grid = grid_tokens(rows, info["parts"], 2)
    assert grid.shape == (5, 4, 2 + 6) and torch.equal(grid[..., :2], clip[:, -1])
    dino_map = dino[:, 0].transpose(1, 2).reshape(5, 6, 3, 3)
    assert torch.allclose(grid[:, 0, 2:], dino_map[:, :, :2, :2].mean((-2, -1)))  # adaptive pool cell (0, 0)


def test_cached_tower_applies_the_norm_rule_and_the_fusion(tmp_path):
    tokens = torch.randn(50, 4, 3) * torch.tensor([1.0, 10.0, 100.0]) + torch.tensor([5.0, -3.0, 0.0])
    path = write_features(tokens, tmp_path / "f.safetensors", {"seed": 0, "image_size": 64})
    rows = tokens.reshape(50, -1)
    raw = CachedTower(str(path))
    assert (raw.dim, raw.num_tokens) == (3, 4) and torch.equal(raw(rows), tokens)
    normed = CachedTower(str(path), norm="layernorm")(rows)
    centred = tokens - tokens.mean(-1, keepdim=True)  # by hand: every token over its 3 channels
    assert torch.allclose(normed, centred / (centred.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt(), atol=1e-5)
    with pytest.raises(ValueError, match=r"expects cached feature rows \[B, 12\]"):
        raw(torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="norm='batchnorm' is unknown"):
        CachedTower(str(path), norm="batchnorm")
    assert CachedTower(str(path), fusion=ResamplerFusion(num_queries=2, width=8, heads=2))(rows).shape == (50, 2, 8)


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
    assert torch.equal(visual, tokens[6 % 4].flatten()) and record["image"] == 2
    assert len(source.dataset(lambda r, v: (r, v))) == 12
    items = ToySource(seed=0, num_images=4, stage="finetune", features=str(path), max_objects=1).eval_items()
    assert len(items) == 16 and [i.image_id for i in items[:5]] == [0, 0, 0, 0, 1]
    assert torch.equal(items[4].load_image(), tokens[1].flatten())
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


def test_encoders_with_one_tokenizer_and_settings_share_their_memo(tiny_llava, monkeypatch):
    """A second run in the same process (the study's run workers) tokenizes nothing the first one did; other
    settings or another tokenizer never read its entries."""
    import mllm.data.encode as encode_module

    _, tokenizer, path = tiny_llava
    calls = []
    real = encode_module.tokenize_conversation
    monkeypatch.setattr(encode_module, "tokenize_conversation", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(encode_module, "_MEMOS", {})
    source = ToySource(seed=1000, num_images=6, stage="finetune", features=path, max_objects=1)
    record, tokens = source.record_and_image(2)
    direct = tokenize_conversation(record["conversations"], tokenizer, 4, 128, num_images=1)
    first = SampleEncoder(tokenizer, 4, 128, 64)(record, tokens)
    assert len(calls) == 1
    again = SampleEncoder(load_tokenizer(tokenizer.name_or_path), 4, 128, 64)(record, tokens)  # reloaded tokenizer
    assert len(calls) == 1 and again["input_ids"].tolist() == first["input_ids"].tolist() == direct[0]
    assert again["labels"].tolist() == direct[1]
    short = SampleEncoder(tokenizer, 4, 40, 64)  # another max_length: its own memo, its own (truncated) result
    truncated = short(record, tokens)
    assert len(calls) == 2
    assert truncated["input_ids"].tolist() == tokenize_conversation(record["conversations"], tokenizer, 4, 40,
                                                                    num_images=1)[0]
    other = copy.deepcopy(tokenizer)
    other.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert encode_module.tokenizer_fingerprint(other) != encode_module.tokenizer_fingerprint(tokenizer)
    assert SampleEncoder(other, 4, 128, 64)._memo is not SampleEncoder(tokenizer, 4, 128, 64)._memo


def test_toy_sources_of_one_world_describe_each_image_once(tiny_llava, monkeypatch):
    import distill.toy.world as world_module
    import mllm.data.toy as toy_module

    _, _, path = tiny_llava
    monkeypatch.setattr(toy_module, "_DESCRIBED", {})
    described = []
    real = world_module.ToyWorld.describe
    monkeypatch.setattr(world_module.ToyWorld, "describe", lambda self, i: described.append(i) or real(self, i))
    first = ToySource(seed=1000, num_images=6, stage="finetune", features=path, max_objects=1)
    records = [first.record(i) for i in range(12)]  # two records per image
    assert sorted(described) == list(range(6))
    second = ToySource(seed=1000, num_images=6, stage="finetune", features=path, max_objects=1)
    assert [second.record(i) for i in range(12)] == records and len(described) == 6
    other_world = ToySource(seed=0, num_images=6, stage="finetune", max_objects=1)  # no features: drawn, not shared
    assert other_world.record(0)["conversations"] == ToySource(seed=0, num_images=6, stage="finetune",
                                                              max_objects=1).record(0)["conversations"]
    assert len(described) == 6


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


def test_rank_answers_sharing_the_prompt_scores_as_whole_rows_with_fewer_tokens(tiny_llava, monkeypatch):
    model, tokenizer, path = tiny_llava
    # fusion options share their first answer token ("striped circle", "striped square"): the shared prompt must
    # stop before it, so those tokens are scored per row
    items = ToySource(seed=1000, num_images=6, stage="finetune", features=path, max_objects=1).eval_items()
    assert {i.kind for i in items} == {"shape", "texture", "size", "fusion"}
    tokens = []
    lm_forward = model.lm.forward

    def counted(*args, **kwargs):
        tokens.append(int(kwargs["inputs_embeds"].shape[0] * kwargs["inputs_embeds"].shape[1]))
        return lm_forward(*args, **kwargs)

    monkeypatch.setattr(model.lm, "forward", counted)
    whole, whole_scores = rank_answers(model, tokenizer, items, batch_size=7, return_scores=True, share_prefix=False)
    whole_tokens, tokens[:] = sum(tokens), []
    shared, shared_scores = rank_answers(model, tokenizer, items, batch_size=7, return_scores=True)
    assert shared == whole
    np.testing.assert_allclose(np.concatenate(shared_scores), np.concatenate(whole_scores), atol=1e-4)
    assert sum(tokens) < whole_tokens / 2


def test_rank_answers_grouped_candidates_score_as_per_row_cache_copies(tiny_llava, monkeypatch):
    import mllm.scoring as scoring

    model, tokenizer, path = tiny_llava
    items = ToySource(seed=1000, num_images=6, stage="finetune", features=path, max_objects=1).eval_items()
    assert scoring._groups_suffixes(model)  # the toy LM's sdpa attention takes the 4D mask
    batches = []
    lm_forward = model.lm.forward

    def counted(*args, **kwargs):
        batches.append(int(kwargs["inputs_embeds"].shape[0]))
        return lm_forward(*args, **kwargs)

    monkeypatch.setattr(model.lm, "forward", counted)
    grouped, grouped_scores = rank_answers(model, tokenizer, items, batch_size=7, return_scores=True)
    grouped_batches, batches[:] = list(batches), []
    monkeypatch.setattr(scoring, "_groups_suffixes", lambda model: False)  # what a flash-attention LM takes
    copied, copied_scores = rank_answers(model, tokenizer, items, batch_size=7, return_scores=True)
    assert grouped == copied
    np.testing.assert_allclose(np.concatenate(grouped_scores), np.concatenate(copied_scores), atol=1e-4)
    # the candidates' pass: one sequence per question, not one per (question, candidate) row
    assert grouped_batches[1::2] == grouped_batches[0::2] and batches[1::2] != batches[0::2]
    assert sum(grouped_batches) == 2 * len(items) < sum(batches)


def test_rank_answers_honours_the_tokenizers_padding_side_and_pad_token(tiny_llava, monkeypatch):
    import copy

    model, tokenizer, path = tiny_llava
    items = ToySource(seed=1000, num_images=3, stage="finetune", features=path, max_objects=1).eval_items()
    right, right_scores = rank_answers(model, tokenizer, items, batch_size=7, return_scores=True, share_prefix=False)
    left_tokenizer = copy.deepcopy(tokenizer)
    left_tokenizer.padding_side = "left"
    left_tokenizer.pad_token = left_tokenizer.eos_token  # another pad id: masked out, so it must not matter
    padded = []
    lm_forward = model.lm.forward

    def record(*args, **kwargs):
        padded.append((kwargs["attention_mask"][:, 0] == 0).any().item())  # a row starting with padding
        return lm_forward(*args, **kwargs)

    monkeypatch.setattr(model.lm, "forward", record)
    left, left_scores = rank_answers(model, left_tokenizer, items, batch_size=7, return_scores=True, share_prefix=False)
    assert any(padded)  # rows really were left-padded
    assert left == right
    np.testing.assert_allclose(np.concatenate(left_scores), np.concatenate(right_scores), atol=1e-4)
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        rank_answers(model, no_pad, items[:1])
