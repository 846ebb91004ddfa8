"""`python -m mllm export`: a toy LLaVA trained with the CLI (toy CLIP tower, toy LM, smoke toy world) loads in
transformers' LlavaForConditionalGeneration + AutoProcessor with the same vision features and the same greedy tokens
as unitower's own generation; towers transformers cannot express are refused with a reason (tests/test_hf_export.py)."""

import warnings

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mllm.conversation import IMAGE_TOKEN_ID, prompt_ids
from mllm.data import ToySource, image_to_tensor
from mllm.generate import generate_answers
from mllm.hf_export import ExportError, vision_export
from mllm.loading import load_tokenizer
from llava_configs import cli_trainer

IMAGE_SIZE = 64
MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def exported(smoke_world, tmp_path_factory):
    """A finetune-stage toy LLaVA trained 120 steps by `python -m mllm fit`, exported with `python -m mllm export`."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mllm.cli import main
    from mllm.module import LlavaModule

    tmp = tmp_path_factory.mktemp("hf_export")
    config = {
        "seed_everything": 0,
        "trainer": cli_trainer(tmp / "run", 120, "finetune"),
        "model": {"tower": {"class_path": "mllm.towers.SingleEncoderTower", "init_args": {"grid": 8, "encoder": {
                      "class_path": "distill.encoders.OpenClipEncoder",
                      "init_args": {"model_name": "toy:clip", "layer": -2}}}},
                  "lm": "toy:lm", "stage": "finetune", "projector_lr": 1e-2, "lm_lr": 1e-3},
        "data": {"train": {"class_path": "mllm.data.ToySource",
                           "init_args": {"seed": 0, "num_images": 32, "stage": "finetune", "questions_per_record": 1}},
                 "batch_size": 8, "image_size": IMAGE_SIZE, "max_length": 160},
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "-c", str(tmp / "config.yaml")])
    ckpt = tmp / "run" / "finetune.ckpt"
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp / "hf")])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
        module = LlavaModule.load_from_checkpoint(str(ckpt), map_location="cpu").eval()
    return {
        "module": module,
        "tokenizer": load_tokenizer("toy:lm"),
        "hf": LlavaForConditionalGeneration.from_pretrained(str(tmp / "hf")).eval(),
        "processor": AutoProcessor.from_pretrained(str(tmp / "hf")),
        "out": tmp / "hf",
        "items": ToySource(seed=1000, num_images=6, stage="finetune", image_size=IMAGE_SIZE).eval_items(limit=10),
    }


@pytest.mark.slow  # shares the module fixture: `python -m mllm fit` 120 steps + export
def test_config_says_what_unitower_does(exported):
    hf, module = exported["hf"], exported["module"]
    assert type(hf.model.vision_tower).__name__ == "CLIPVisionModel"
    assert hf.config.vision_feature_layer == -2 and hf.config.vision_feature_select_strategy == "default"
    assert hf.config.image_seq_length == module.model.tower.num_tokens == 64
    assert hf.config.vision_config.hidden_act == "gelu"  # the toy CLIP is built with nn.GELU, not QuickGELU
    assert hf.config.projector_hidden_act == "gelu"
    assert hf.config.image_token_id == len(exported["tokenizer"])  # a new id after the LM's vocabulary


@pytest.mark.slow  # shares the module fixture: `python -m mllm fit` 120 steps + export
def test_vision_features_equal_unitower_tower(exported):
    module, hf, processor = exported["module"], exported["hf"], exported["processor"]
    images = [item.load_image() for item in exported["items"][:4]]
    pixels = torch.stack([image_to_tensor(image, IMAGE_SIZE) for image in images])
    with torch.no_grad():
        ours_pixels = module.model.tower.encoder.preprocess(pixels)
        hf_pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        pixel_diff = (hf_pixels - ours_pixels).abs().max().item()
        ours_tokens = module.model.tower(pixels)
        hidden = hf.model.vision_tower(hf_pixels, output_hidden_states=True).hidden_states[hf.config.vision_feature_layer]
        token_diff = (hidden[:, 1:] - ours_tokens).abs().max().item()
        projected = torch.stack(hf.model.get_image_features(pixel_values=hf_pixels).pooler_output)
        projected_diff = (projected - module.model.image_features(pixels)).abs().max().item()
    print(f"max abs diff: pixels {pixel_diff:.2e}, tower tokens {token_diff:.2e} "
          f"(scale {ours_tokens.abs().max().item():.2f}), projected {projected_diff:.2e}")
    assert hidden[:, 1:].shape == ours_tokens.shape == (4, 64, 64)
    assert pixel_diff < 1e-5 and token_diff < 1e-4 and projected_diff < 1e-4


@pytest.mark.slow  # shares the module fixture: `python -m mllm fit` 120 steps + export
def test_processor_resizes_like_unitower(exported):
    """A non-square image of another size: the PIL backend resizes and crops exactly as unitower's data path does."""
    from transformers import AutoProcessor

    module = exported["module"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    ours = module.model.tower.encoder.preprocess(image_to_tensor(image, IMAGE_SIZE)[None])
    pil = AutoProcessor.from_pretrained(str(exported["out"]), backend="pil").image_processor
    default = exported["processor"].image_processor
    pil_diff = (pil(images=image, return_tensors="pt")["pixel_values"] - ours).abs().max().item()
    default_diff = (default(images=image, return_tensors="pt")["pixel_values"] - ours).abs().max().item()
    print(f"resized pixels max abs diff: pil backend {pil_diff:.2e}, default ({type(default).__name__}) {default_diff:.2e}")
    assert pil_diff < 1e-5 and default_diff < 0.1


def _unitower_new_ids(module, tokenizer, item, min_new_tokens: int = 0) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy new ids) of one question through unitower's LlavaModel: its `generate` (what
    generate_answers runs) or, with min_new_tokens, the same LM call with EOS held back that many tokens."""
    model = module.model
    ids = prompt_ids(item.question, tokenizer, model.tower.num_tokens, True, module.hparams.chat_template)
    input_ids, mask = torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
    pixels = image_to_tensor(item.load_image(), IMAGE_SIZE)[None]
    if not min_new_tokens:
        new = model.generate(input_ids, mask, pixels, max_new_tokens=MAX_NEW_TOKENS,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        return ids, new[0].tolist()
    with torch.no_grad():
        new = model.lm.generate(inputs_embeds=model.embed(input_ids, pixels), attention_mask=mask, do_sample=False,
                                max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=min_new_tokens,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return ids, new[0].tolist()


@pytest.mark.slow  # shares the module fixture: `python -m mllm fit` 120 steps + export
def test_generate_gives_unitowers_tokens(exported):
    module, tokenizer, hf, processor = exported["module"], exported["tokenizer"], exported["hf"], exported["processor"]
    items = exported["items"]
    answers = generate_answers(module.model, tokenizer, items, IMAGE_SIZE, MAX_NEW_TOKENS,
                               chat_template=module.hparams.chat_template)  # what `python -m mllm evaluate` runs
    same, same_long, logit_diff, long_answers = 0, 0, 0.0, set()
    for item, answer in zip(items, answers):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=item.load_image(), text=prompt, return_tensors="pt")
        ours_prompt, ours_new = _unitower_new_ids(module, tokenizer, item)
        hf_prompt = inputs["input_ids"][0].tolist()
        assert [IMAGE_TOKEN_ID if t == hf.config.image_token_id else t for t in hf_prompt] == ours_prompt
        with torch.no_grad():
            hf_new = hf.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0, len(hf_prompt):].tolist()
            hf_long = hf.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS,
                                  do_sample=False)[0, len(hf_prompt):].tolist()
            hf_logits = hf(**inputs).logits[0, :, :len(tokenizer)]  # every prompt position, not only the argmax
            ours_ids = torch.tensor([ours_prompt])
            pixels = image_to_tensor(item.load_image(), IMAGE_SIZE)[None]
            ours_logits = module.model(ours_ids, torch.ones_like(ours_ids), pixels).logits[0]
        ours_long = _unitower_new_ids(module, tokenizer, item, min_new_tokens=MAX_NEW_TOKENS)[1]
        hf_text = processor.decode(hf_new, skip_special_tokens=True).strip()
        print(f"{item.question!r}: unitower {ours_new} {answer!r} / {ours_long} | transformers {hf_new} {hf_text!r} / {hf_long}")
        logit_diff = max(logit_diff, (hf_logits - ours_logits).abs().max().item())
        same += hf_new == ours_new and hf_text == answer
        same_long += hf_long == ours_long
        long_answers.add(tuple(ours_long))
    print(f"identical generated tokens: {same}/{len(items)} (stop at eos), {same_long}/{len(items)} "
          f"({MAX_NEW_TOKENS} tokens forced); prompt logits max abs diff {logit_diff:.2e}")
    assert same == same_long == len(items) and logit_diff < 1e-3
    assert len(long_answers) > 1, "every question got the same continuation: the comparison would prove little"


def test_cli_export_refuses_a_missing_checkpoint(tmp_path):
    from mllm.cli import main

    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["export", "--ckpt", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "hf")])


@pytest.fixture(scope="module")
def toy_encoders(smoke_world):
    from distill.encoders import OpenClipEncoder, TimmEncoder

    return {"clip": OpenClipEncoder("toy:clip", layer=-2), "dino": TimmEncoder("toy:dino", layer=-2)}


def test_refuses_ensemble_tower_with_reason(toy_encoders):
    from mllm.towers import EnsembleTower

    with pytest.raises(ExportError, match="EnsembleTower.*one vision model.*trust_remote_code"):
        vision_export(EnsembleTower([toy_encoders["clip"], toy_encoders["dino"]]))


def test_refuses_what_llava_cannot_compute(toy_encoders):
    from distill.encoders import OpenClipEncoder
    from mllm.towers import SingleEncoderTower

    with pytest.raises(ExportError, match="grid=4.*8x8.*cannot express"):
        vision_export(SingleEncoderTower(toy_encoders["clip"], grid=4))
    with pytest.raises(ExportError, match="TimmWrapperModel's hidden_states.*NCHW"):
        vision_export(SingleEncoderTower(toy_encoders["dino"]))
    with pytest.raises(ExportError, match="ln_post"):
        vision_export(SingleEncoderTower(OpenClipEncoder("toy:clip", layer=-1)))
    kept = vision_export(SingleEncoderTower(toy_encoders["clip"], keep_cls=True))
    assert kept["select_strategy"] == "full" and kept["feature_layer"] == -2


def test_transformers_llava_still_cannot_run_a_timm_wrapper_vit(tmp_path):
    """Why timm towers are refused: Llava cannot even be built on TimmWrapperConfig (no hidden_size), and with one
    given it projects TimmWrapper's NCHW hidden states along the wrong axis. If this ever passes through, the
    installed transformers can express timm towers and the export should map them instead of refusing."""
    import timm
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, TimmWrapperConfig

    from tiny_teachers import write_timm_dir

    vision = TimmWrapperConfig.from_pretrained(str(write_timm_dir(tmp_path / "vit")))
    vision.model_args = {k: v for k, v in (vision.model_args or {}).items() if k != "num_classes"}  # issue 10's bug
    text = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=49, vision_feature_layer=-2)
    with pytest.raises(AttributeError, match="hidden_size"):
        LlavaForConditionalGeneration(config)
    vision.hidden_size = timm.create_model(vision.architecture, pretrained=False).embed_dim
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=49,
                                                      vision_feature_layer=-2)).eval()
    pixels = torch.zeros(1, 3, *vision.pretrained_cfg["input_size"][-2:])
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
        assert hidden.ndim == 4 and hidden.shape[1] == vision.hidden_size  # NCHW, no prefix tokens
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            model.model.get_image_features(pixel_values=pixels)
