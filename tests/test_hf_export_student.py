"""`unitower llava export` of a LLaVA whose tower is the distilled student (mllm/hf_student.py): in a fresh
process, transformers' LlavaForConditionalGeneration + AutoProcessor give the project's prompt logits (max abs
diff < 1e-5) and greedy tokens; students it cannot express are refused with the reason
(tests/test_hf_export_student.py)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.model import StudentModel
from mllm.conversation import IMAGE_TOKEN_ID, prompt_ids
from mllm.data import image_to_tensor
from mllm.hf_export import ExportError, export_model, vision_export
from mllm.loading import load_tokenizer
from mllm.model import LlavaModel
from mllm.towers import StudentTower
from tiny_llava import write_tiny_lm

ARGS = {"embed_dim": 32, "depth": 3, "num_heads": 2, "patch_size": 8}
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
SIDE, NEW_TOKENS = 32, 5
QUESTIONS = ["what color is the circle?", "is there a red circle in the image?", "describe the image briefly."]


def write_student(folder: Path, summary_names=("clip",), num_registers=0, cpe_max_grid=None, seed=0) -> Path:
    torch.manual_seed(seed)
    model = StudentModel("vit_small_patch16_224", list(summary_names), num_registers=num_registers, img_size=SIDE,
                         mean=MEAN, std=STD, model_args=ARGS, cpe_max_grid=cpe_max_grid)
    model.add_adaptor("clip", 24, 20, hidden_dim=16)
    with torch.no_grad():  # a visible position embedding (timm starts it near zero)
        model.model.pos_embed.normal_(0, 0.5)
    return model.export(folder)


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)) for _ in QUESTIONS]


HF_SCRIPT = """
import json, sys, numpy as np, torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
folder, questions, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
images = [Image.fromarray(rng.integers(0, 256, ({side}, {side}, 3), dtype=np.uint8)) for _ in questions]
model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder, backend="pil")
result = []
for image, question in zip(images, questions):
    messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": question}}]}}]
    inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        new = model.generate(**inputs, max_new_tokens={new}, min_new_tokens={new}, do_sample=False)
    ids = inputs["input_ids"][0].tolist()
    result.append({{"prompt": ids, "logits": logits.tolist(), "new": new[0, len(ids):].tolist(),
                    "vision": type(model.model.vision_tower).__name__}})
json.dump(result, open(out, "w"))
""".format(side=SIDE, new=NEW_TOKENS)


@pytest.mark.parametrize("cpe", [None, 8], ids=["plain", "cpe"])
def test_student_llava_in_transformers_matches_unitower(tmp_path, cpe):
    lm = write_tiny_lm(tmp_path / "lm", steps=2)
    tokenizer = load_tokenizer(str(lm))
    from transformers import AutoModelForCausalLM

    tower = StudentTower(str(write_student(tmp_path / "student", cpe_max_grid=cpe)), layer=-2)
    torch.manual_seed(1)
    model = LlavaModel(tower, AutoModelForCausalLM.from_pretrained(lm), "mlp2x_gelu").eval()
    with torch.no_grad():  # a projector that moves the logits, so images matter
        for p in model.projector.parameters():
            p.normal_(0, 0.5)
    export_model(model, tokenizer, str(tmp_path / "hf"), image_size=SIDE)
    out = tmp_path / "hf.json"
    subprocess.run([sys.executable, "-c", HF_SCRIPT, str(tmp_path / "hf"), json.dumps(QUESTIONS), str(out)],
                   check=True, cwd=tmp_path)  # a fresh process: nothing of unitower is imported there
    hf = json.loads(out.read_text())
    logit_diff, continuations = 0.0, set()
    for image, question, theirs in zip(images(), QUESTIONS, hf):
        assert theirs["vision"] == "Dinov2Model"
        ids = prompt_ids(question, tokenizer, tower.num_tokens, True, None)
        image_token = max(theirs["prompt"])
        assert [IMAGE_TOKEN_ID if t == image_token else t for t in theirs["prompt"]] == ids
        input_ids, mask = torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
        pixels = image_to_tensor(image, SIDE)[None]
        with torch.no_grad():
            logits = model(input_ids, mask, pixels).logits[0]
            other = model(input_ids, mask, pixels.flip(-1)).logits[0]  # the image matters: a mirrored one moves logits
            new = model.lm.generate(inputs_embeds=model.embed(input_ids, pixels), attention_mask=mask,
                                    do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                    pad_token_id=tokenizer.pad_token_id)[0].tolist()
        assert (other - logits).abs().max() > 1e-3
        theirs_logits = torch.tensor(theirs["logits"])[:, :logits.shape[-1]]
        logit_diff = max(logit_diff, (theirs_logits - logits).abs().max().item())
        assert theirs["new"] == new
        continuations.add(tuple(new))
    print(f"student LLaVA ({'cpe' if cpe else 'plain'}): prompt logits max abs diff {logit_diff:.2e}, "
          f"greedy tokens identical for {len(QUESTIONS)}/{len(QUESTIONS)} questions")
    assert logit_diff < 1e-5
    assert tower.num_tokens == (SIDE // 8) ** 2


def test_refuses_students_llava_cannot_express(tmp_path):
    radio_like = StudentTower(str(write_student(tmp_path / "reg", ("clip", "dino"), num_registers=2)), layer=-2)
    with pytest.raises(ExportError, match=r"4 prefix tokens.*drops at most one leading token"):
        vision_export(radio_like)
    folder = write_student(tmp_path / "one")
    with pytest.raises(ExportError, match="before it"):
        vision_export(StudentTower(str(folder), layer=-1))
    with pytest.raises(ExportError, match="adaptor heads"):
        vision_export(StudentTower(str(folder), layer=-2, adaptors=["clip"]))
    with pytest.raises(ExportError, match=r"grid=2.*4x4"):
        vision_export(StudentTower(str(folder), layer=-2, grid=2))
    with pytest.raises(ExportError, match=r"norm='layernorm'.*no normalisation"):
        vision_export(StudentTower(str(folder), layer=-2, norm="layernorm"))
    kept = vision_export(StudentTower(str(folder), layer=-2, keep_cls=True))
    assert kept["select_strategy"] == "full" and kept["feature_layer"] == -2


def test_refuses_modules_transformers_llava_has_no_place_for(tmp_path):
    """A fusion module (or anything else) beside tower, projector and LM is refused, not silently dropped."""
    from transformers import AutoModelForCausalLM

    lm = write_tiny_lm(tmp_path / "lm", steps=1)
    model = LlavaModel(StudentTower(str(write_student(tmp_path / "s")), layer=-2),
                       AutoModelForCausalLM.from_pretrained(lm), "mlp2x_gelu")
    model.fusion = torch.nn.Linear(32, 32)
    with pytest.raises(ExportError, match=r"modules \['fusion'\].*trust_remote_code"):
        export_model(model, load_tokenizer(str(lm)), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
