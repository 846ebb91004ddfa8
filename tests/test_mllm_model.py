"""LlavaModel: where image tokens are spliced, text-only batches, errors, projectors, generation (tests/test_mllm_model.py)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from mllm.conversation import IMAGE_TOKEN_ID
from mllm.data import EvalItem
from mllm.fusion import ChannelFusion
from mllm.generate import generate_answers
from mllm.model import LlavaModel
from mllm.projector import build_projector
from tiny_llava import tiny_image, write_tiny_lm
from mllm.towers import VisionTower


class PoolTower(VisionTower):
    """Images -> 2x2 average-pooled RGB tokens [B, 4, 3] (one "encoder", one layer, channel fusion)."""

    def __init__(self):
        super().__init__(trainable=False)
        self.dim, self.input_size = 3, (8, 8)
        self.fusion = ChannelFusion()
        self.fusion.bind([3], None)
        self.register_buffer("unused", torch.zeros(1))

    def features(self, images):
        return [F.adaptive_avg_pool2d(images, 2).flatten(2).transpose(1, 2)[:, None]]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return write_tiny_lm(tmp_path_factory.mktemp("lm") / "lm", steps=5)


@pytest.fixture()
def model(lm_dir):
    torch.manual_seed(0)
    return LlavaModel(PoolTower(), AutoModelForCausalLM.from_pretrained(lm_dir), "linear").eval()


def test_projector_kinds():
    assert isinstance(build_projector("linear", 3, 5), torch.nn.Linear)
    mlp = build_projector("mlp3x_gelu", 3, 5)
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert mlp(torch.zeros(2, 4, 3)).shape == (2, 4, 5)
    with pytest.raises(ValueError, match="mlpNx_gelu"):
        build_projector("mlp2x_relu", 3, 5)


def test_image_tokens_replace_placeholders_in_order(model):
    images = torch.rand(2, 3, 8, 8)
    ids = torch.tensor([[5, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 7, 0],
                        [6, 8, 9, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID]])
    embeds = model.embed(ids, images)
    projected = model.projector(PoolTower()(images))
    table = model.lm.get_input_embeddings().weight
    assert torch.allclose(embeds[0, 1:5], projected[0]) and torch.allclose(embeds[1, 3:7], projected[1])
    assert torch.allclose(embeds[0, 0], table[5]) and torch.allclose(embeds[0, 5], table[7])
    assert torch.allclose(embeds[1, :3], table[[6, 8, 9]])


def test_text_only_batch_and_count_mismatch(model):
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(model.embed(ids, None), model.lm.get_input_embeddings()(ids))
    out = model(ids, torch.ones_like(ids), None, labels=ids)
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="image-token positions"):
        model.embed(torch.tensor([[5, IMAGE_TOKEN_ID, 6]]), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="no images"):
        model.embed(torch.tensor([[5, IMAGE_TOKEN_ID, 6]]), None)


def test_padding_does_not_change_the_loss(model):
    ids = torch.tensor([[5, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 7, 8]])
    labels = torch.tensor([[-100, -100, -100, -100, -100, 7, 8]])
    images = torch.rand(1, 3, 8, 8)
    alone = model(ids, torch.ones_like(ids), images, labels).loss
    padded_ids = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    padded_labels = torch.cat([labels, torch.full((1, 3), -100)], 1)
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 3)], 1).long()
    assert torch.allclose(alone, model(padded_ids, mask, images, padded_labels).loss, atol=1e-5)


def test_batched_generation_equals_one_by_one(model, lm_dir):
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    items = [EvalItem("what color is the circle?", "red", "color", None, lambda: tiny_image(0)),
             EvalItem("describe the image briefly.", "a red circle.", "caption", None, lambda: tiny_image(1)),
             EvalItem("is there a red circle in the image?", "yes", "existence", None, lambda: None)]
    batched = generate_answers(model, tokenizer, items, image_size=8, max_new_tokens=5, batch_size=3)
    single = [generate_answers(model, tokenizer, [item], image_size=8, max_new_tokens=5)[0] for item in items]
    assert batched == single
    assert all(isinstance(answer, str) for answer in batched)


def test_cached_batched_generate_matches_uncached_greedy(model, lm_dir):
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    first = tokenizer("user : what color is the circle ? assistant :", add_special_tokens=False)["input_ids"]
    second = tokenizer("user : is there a red circle ? assistant :", add_special_tokens=False)["input_ids"]
    prompts = [[1, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID] + first, [1] + second]
    images = torch.rand(1, 3, 8, 8)
    expected = []
    for prompt, image in zip(prompts, [images, None]):  # greedy without cache, one prompt at a time
        ids = torch.tensor([prompt])
        for _ in range(4):
            logits = model(ids, torch.ones_like(ids), image).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        expected.append(ids[0, len(prompt):].tolist())
    length = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    new = model.generate(input_ids, mask, images, max_new_tokens=4, eos_token_id=-1, pad_token_id=0)
    assert new.tolist() == expected
