"""Data sources for the LLaVA stages: LLaVA conversation JSON + image folder, webdataset shards, the toy world.

Every source yields LLaVA records (`{"id", "image"?, "conversations": [...]}`) and their images; a
`SampleEncoder` turns a record into training tensors (token ids, labels, image [3, S, S]) and returns
None for a bad record, which `collate` drops and counts. Sources (chosen in YAML with class_path):

    ToySource(seed=0, num_images=2000, stage="align")        the toy world (default)
    LlavaJsonSource("llava_v1_5_mix665k.json", "images/")      LLaVA's released format
    WebDataSource("shards/{000000..000099}.tar")               tar shards with jpg|png + json members

Each source also gives `eval_items()`: single questions with reference answers and kinds for evaluation.
"""

from mllm.data.base import ALIGN_PROMPT, DataSource, EvalItem, RecordDataset, UnusableImage
from mllm.data.encode import SampleEncoder, collate, image_to_tensor
from mllm.data.llava_json import LlavaJsonSource, check_record, load_llava_json
from mllm.data.shards import WebDataSource
from mllm.data.toy import ToySource

__all__ = [
    "ALIGN_PROMPT", "DataSource", "EvalItem", "LlavaJsonSource", "RecordDataset", "SampleEncoder", "ToySource",
    "UnusableImage", "WebDataSource", "check_record", "collate", "image_to_tensor", "load_llava_json",
]
