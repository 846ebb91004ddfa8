"""The lmms-eval entry "unitower" (mllm/lmms_eval.py): its methods on lmms-eval Instance objects agree with
`python -m mllm evaluate`'s generation and with the LM loss, and lmms-eval's own evaluator runs it on tiny local
generate_until and multiple_choice tasks (tests/test_lmms_eval.py). Skipped when lmms-eval is not installed."""

import json

import pytest
import torch
import yaml

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed; `pip install -e '.[lmms]'` to run these tests")

from lmms_eval.api.instance import Instance  # noqa: E402

from mllm.conversation import prompt_ids  # noqa: E402
from mllm.data import LlavaJsonSource, image_to_tensor  # noqa: E402
from mllm.generate import generate_answers  # noqa: E402
from mllm.lmms_eval import UnitowerLlava, register  # noqa: E402
from tiny_llava import COLORS, tiny_llava_records, write_llava_json, write_tiny_lm  # noqa: E402
from llava_configs import cli_trainer, timm_tower  # noqa: E402

IMAGE_SIZE = 32
TASK_UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_choice(doc):
    return doc["choices"]


def doc_to_target_index(doc):
    return doc["choices"].index(doc["answer"])


def process_results(doc, results):
    return {"exact": float(results[0].strip() == doc["answer"])}
'''

TASK_COMMON = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files: {{test: "{data}"}}
test_split: test
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A toy LLaVA (tiny timm tower, 2x2 tokens, tiny LM) trained 40 finetune steps by `python -m mllm fit`."""
    from tiny_teachers import write_timm_dir
    from mllm.cli import make_cli

    tmp = tmp_path_factory.mktemp("lmms")
    lm, vit = write_tiny_lm(tmp / "lm", steps=10), write_timm_dir(tmp / "vit")
    records = tiny_llava_records(tmp / "img", 8, "finetune")
    data = write_llava_json(records, tmp / "finetune.json")
    config = {
        "seed_everything": 0,
        "trainer": cli_trainer(tmp / "run", 40, "ft"),
        "model": {"tower": timm_tower(vit),
                  "lm": str(lm), "stage": "finetune", "lm_lr": 1e-3, "projector_lr": 1e-2},
        "data": {"train": {"class_path": "mllm.data.LlavaJsonSource",
                           "init_args": {"json_path": str(data), "image_folder": str(tmp / "img")}},
                 "batch_size": 4, "image_size": IMAGE_SIZE, "max_length": 64},
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    make_cli(["fit", "-c", str(tmp / "config.yaml")])
    docs = [{"image": str(tmp / "img" / r["image"]), "question": r["conversations"][0]["value"].split("\n", 1)[1],
             "answer": r["conversations"][1]["value"], "choices": list(COLORS)} for r in records]
    entry = UnitowerLlava(ckpt=str(tmp / "run" / "ft.ckpt"), image_size=IMAGE_SIZE, batch_size=4, max_new_tokens=3)
    source = LlavaJsonSource(str(data), str(tmp / "img"))
    return {"tmp": tmp, "ckpt": tmp / "run" / "ft.ckpt", "docs": docs, "entry": entry, "source": source}


def _instance(kind: str, arguments: tuple, doc_id: int) -> Instance:
    return Instance(request_type=kind, arguments=arguments, idx=0,
                    metadata={"task": "tiny", "doc_id": doc_id, "repeats": 1})


def _doc_to_visual(doc):
    from PIL import Image

    return [Image.open(doc["image"]).convert("RGB")]


def test_generate_until_answers_as_mllm_evaluate(setup):
    entry = setup["entry"]
    entry.task_dict = {"tiny": {"test": setup["docs"]}}
    requests = [_instance("generate_until", (f"<image>\n{d['question']}", {"max_new_tokens": 3, "until": ["\n"]},
                                             _doc_to_visual, i, "tiny", "test"), i) for i, d in enumerate(setup["docs"])]
    answers = entry.generate_until(requests)
    expected = generate_answers(entry.model, entry.tokenizer, setup["source"].eval_items(), IMAGE_SIZE, 3, batch_size=4)
    print("generate_until:", answers)
    assert answers == expected and len(answers) == 8 and len(set(answers)) > 1


def test_loglikelihood_is_the_continuation_loss(setup):
    entry, docs = setup["entry"], setup["docs"]
    entry.task_dict = {"tiny": {"test": docs}}
    requests = [_instance("loglikelihood", (d["question"], f" {c}", _doc_to_visual, i, "tiny", "test"), i)
                for i, d in enumerate(docs[:3]) for c in COLORS]
    results = entry.loglikelihood(requests)
    model, tokenizer = entry.model, entry.tokenizer
    for request, (nll, greedy) in zip(requests, results):
        question, continuation, _, doc_id, _, _ = request.args
        prompt = prompt_ids(question, tokenizer, model.tower.num_tokens, True)
        target = tokenizer(continuation.strip(), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + target])
        labels = torch.tensor([[-100] * len(prompt) + target])
        image = image_to_tensor(_doc_to_visual(docs[doc_id])[0], IMAGE_SIZE)[None]
        with torch.no_grad():  # the LM's own mean cross-entropy over the labelled tokens
            loss = model(ids, torch.ones_like(ids), image, labels).loss.item()
        with torch.no_grad():  # KV-cached greedy decoding of as many tokens as the continuation has
            new = model.lm.generate(inputs_embeds=model.embed(torch.tensor([prompt]), image),
                                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
                                    max_new_tokens=len(target), min_new_tokens=len(target),
                                    pad_token_id=tokenizer.pad_token_id)
        assert nll == pytest.approx(loss, abs=1e-5) and nll > 0  # lmms-eval's convention: the loss, lower is likelier
        assert greedy == (new[0].tolist() == target)
    print("loglikelihood:", [(round(lp, 3), g) for lp, g in results])
    for question in range(3):  # the trained toy model: the likeliest colour is the answer, and it is the greedy one
        scores = results[question * len(COLORS):(question + 1) * len(COLORS)]
        best = min(range(len(COLORS)), key=lambda c: scores[c][0])
        assert COLORS[best] == docs[question]["answer"] and [g for _, g in scores] == [c == best for c in range(len(COLORS))]


@pytest.fixture(scope="module")
def local_tasks(setup):
    """lmms-eval task folder: the tiny records as a generate_until and a multiple_choice task over a local JSON file."""
    folder = setup["tmp"] / "tasks"
    folder.mkdir()
    (folder / "data.json").write_text(json.dumps(setup["docs"]))
    (folder / "utils.py").write_text(TASK_UTILS)
    data = folder / "data.json"
    (folder / "unitower_tiny_qa.yaml").write_text(TASK_COMMON.format(task="unitower_tiny_qa", data=data) + """\
output_type: generate_until
doc_to_target: answer
generation_kwargs: {max_new_tokens: 3, until: ["\\n"]}
process_results: !function utils.process_results
metric_list:
  - {metric: exact, aggregation: mean, higher_is_better: true}
""")
    (folder / "unitower_tiny_mc.yaml").write_text(TASK_COMMON.format(task="unitower_tiny_mc", data=data) + """\
output_type: multiple_choice
doc_to_choice: !function utils.doc_to_choice
doc_to_target: !function utils.doc_to_target_index
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
""")
    return folder


def _run(setup, local_tasks, task: str) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    register()
    return simple_evaluate(
        model="unitower", model_args=f"ckpt={setup['ckpt']},image_size={IMAGE_SIZE},batch_size=4",
        tasks=[task], device="cpu", log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(local_tasks)),
    )


@pytest.mark.slow
def test_lmms_eval_runs_the_entry_on_a_local_generation_task(setup, local_tasks):
    result = _run(setup, local_tasks, "unitower_tiny_qa")
    metrics = {k: v for k, v in result["results"]["unitower_tiny_qa"].items() if k != "alias"}
    responses = [s["filtered_resps"][0] for s in sorted(result["samples"]["unitower_tiny_qa"], key=lambda s: s["doc_id"])]
    print("lmms-eval results:", json.dumps(metrics), "responses:", responses)
    entry = setup["entry"]
    expected = generate_answers(entry.model, entry.tokenizer, setup["source"].eval_items(), IMAGE_SIZE, 3, batch_size=4)
    assert responses == expected
    exact = sum(r == d["answer"] for r, d in zip(expected, setup["docs"])) / len(expected)
    assert metrics["exact,none"] == pytest.approx(exact)


@pytest.mark.slow
def test_lmms_eval_runs_the_entry_on_a_local_multiple_choice_task(setup, local_tasks):
    from lmms_eval.api.instance import unwrap_generation_output

    if isinstance(unwrap_generation_output((1.0, True))[0], str):  # lmms-eval 0.7.3: multiple_choice then crashes
        pytest.xfail("lmms-eval bug: the evaluator's unwrap_generation_output turns every loglikelihood (float, bool) "
                     "pair into a string, so multiple_choice scoring fails with 'too many values to unpack'")
    result = _run(setup, local_tasks, "unitower_tiny_mc")
    metrics = {k: v for k, v in result["results"]["unitower_tiny_mc"].items() if k != "alias"}
    print("lmms-eval results:", json.dumps(metrics))
    assert 0.0 <= metrics["acc,none"] <= 1.0 and len(result["samples"]["unitower_tiny_mc"]) == 8
