"""GPU check: every CUDA path of unitower once, on random-init real architectures, with images/s, MFU and peak memory.

    python scripts/gpu_check.py                     # one GPU, <= 8 minutes (--budget-s 480)
    python scripts/gpu_check.py --cpu               # the same code at tiny sizes, a few steps (tests/test_gpu_check.py)
    python scripts/gpu_check.py --lm-layers 8 --paths llava_align llava_lora     # a subset, a shorter LM

Paths, in this order (each a function that returns its figures; an exception is caught, reported with the end of
its traceback, and the next path still runs; a path starts only while --budget-s has time left):
  distill_online  configs/distill/radio_b16.yaml as it is (CLIP ViT-L/14-336 + DINOv2-L/14 @448 + SAM ViT-H @1024
                  teachers, ViT-B/16 student @432) with the teachers' weight files dropped (random init), teacher
                  precision bf16, through `distill fit`'s CLI (DistillModule + Lightning Trainer, bf16-mixed)
  distill_cached  `distill cache` writes a small teacher cache (teachers on the GPU), then a fit reads it
  distill_ddp     distill_online with strategy ddp, one process (NCCL on a GPU, gloo on the CPU)
  distill_fsdp    distill_online with strategy fsdp, one process (Lightning refuses FSDP on the CPU: skipped there)
  student_export  `distill export --with-adaptors` of distill_online's last.ckpt, reloaded by StudentModel.from_export
                  and timm's local-dir loader; max abs differences against the checkpoint's student
  llava_align     configs/mllm/llava15_align.yaml: CLIP ViT-L/14-336 tower (random init) + a random 7B-shaped Llama
                  (hidden 4096, 32 layers, bf16; --lm-layers cuts layers) through `llava fit`'s CLI (LlavaModule)
  llava_lora      configs/mllm/llava15_finetune_lora.yaml from llava_align's checkpoint, strategy --lora-strategy
                  (default single device; the recipe's own is fsdp)
  llava_export    mllm/hf_export.py's Llava export (LoRA merged) with a --export-lm-layers LM, reloaded with
                  transformers; tower and LM max abs differences
Per path it prints: images/s over the timed steps (each synchronized, from batch start to batch end: the data
loader's wait is not in it; the first step is not timed), GFLOPs per image counted by torch's FlopCounterMode on
the first step (teachers' forward, student forward + backward; matmuls, convolutions and attention; with gradient
checkpointing, as in the LoRA recipe, the recomputed forward too), MFU = counted
FLOPs/s over the device's peak dense bf16 FLOPs (the assumed peak is printed; --peak-tflops sets it), peak memory
(torch.cuda.max_memory_allocated) and wall seconds; then a table, and the results as JSON (--out/results.json).
Images are toy-world pictures generated small and cropped up to each recipe's size (cheap to make).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml
from lightning.pytorch.callbacks import Callback

# Peak dense (no sparsity) bf16 tensor FLOPs per second, from the vendors' data sheets; the longest name that is a
# substring of torch.cuda.get_device_name() wins.
PEAK_BF16_FLOPS = {
    "H200 NVL": 835e12, "H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
    "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
}
PATHS = ("distill_online", "distill_cached", "distill_ddp", "distill_fsdp", "student_export",
         "llava_align", "llava_lora", "llava_export")
DISTILL_RECIPE = "configs/distill/radio_b16.yaml"
ALIGN_RECIPE = "configs/mllm/llava15_align.yaml"
LORA_RECIPE = "configs/mllm/llava15_finetune_lora.yaml"
# Vicuna-7B-v1.5's shape (LLaVA-1.5's LM); the CPU run's LM keeps the family, not the widths.
LM_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
LM_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY_CLIP = "gpu-check-tiny-ViT-L-14-336-quickgelu"  # ViT-L-14-336-quickgelu's open_clip config at tiny widths


def log(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class Check:
    """What every path reads: the options, the device, the work folder and what earlier paths left."""

    args: argparse.Namespace
    work: Path
    device: torch.device
    peak_flops: float | None
    made: dict = field(default_factory=dict)  # artifacts of earlier paths: checkpoints, tiny model names

    @property
    def cpu(self) -> bool:
        return self.args.cpu

    @property
    def accelerator(self) -> str:
        return "cpu" if self.cpu else "gpu"


# ---------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_images(batch) -> int:
    """Images in a training batch: distill (a tensor, or {"images", "targets"} from a cache) or LLaVA (a dict)."""
    if isinstance(batch, torch.Tensor):
        return len(batch)
    images = batch.get("images") if isinstance(batch, dict) else None
    return 0 if images is None else len(images)


@contextlib.contextmanager
def inference_mode_as_no_grad():
    """`torch.inference_mode()` calls made inside act as `torch.no_grad()`. For the FLOP-counted step only:
    torch 2.14's FlopCounterMode decomposes ops such as einsum below autocast when inference mode is on, so SAM's
    rel-pos einsum meets bf16 and fp32 operands and fails; under no_grad the same ops count fine."""
    real = torch.inference_mode
    torch.inference_mode = lambda mode=True: torch.no_grad() if mode else contextlib.nullcontext()
    try:
        yield
    finally:
        torch.inference_mode = real


class StepMeter(Callback):
    """FLOPs of the first training step (FlopCounterMode; inference mode acting as no_grad) and synchronized
    seconds of every later step."""

    def __init__(self) -> None:
        self.flops: int | None = None
        self.flops_images = 0
        self.seconds: list[float] = []
        self.images: list[int] = []
        self._counter = None
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.flops is None and self._counter is None and not self.seconds:
            from torch.utils.flop_counter import FlopCounterMode

            self._counter = contextlib.ExitStack()
            self._counter.enter_context(inference_mode_as_no_grad())
            self._flop_mode = self._counter.enter_context(FlopCounterMode(display=False))
            return
        synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._counter is not None:
            self._close()
            self.flops_images = batch_images(batch)
            return
        synchronize(pl_module.device)
        self.seconds.append(time.perf_counter() - self._start)
        self.images.append(batch_images(batch))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._counter is not None:
            self._close()

    def _close(self) -> None:
        counter, self._counter = self._counter, None
        counter.close()
        self.flops = int(self._flop_mode.get_total_flops())

    def figures(self, peak_flops: float | None) -> dict:
        """images_per_s, gflops_per_image, mfu (None where not measured) and the steps timed."""
        out = {"steps_timed": len(self.seconds), "images_per_s": None, "gflops_per_image": None, "mfu": None}
        if self.seconds and sum(self.images):
            out["images_per_s"] = sum(self.images) / sum(self.seconds)
        if self.flops and self.flops_images:
            out["gflops_per_image"] = self.flops / self.flops_images / 1e9
        if out["images_per_s"] and out["gflops_per_image"] and peak_flops:
            out["mfu"] = out["images_per_s"] * out["gflops_per_image"] * 1e9 / peak_flops
        return out


def device_peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    """(peak dense bf16 FLOPs/s, where the figure comes from) of `device`; None where unknown (no MFU then)."""
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOPs (--peak-tflops)"
    if device.type != "cuda":
        return None, "unknown on CPU (pass --peak-tflops for an MFU)"
    name = torch.cuda.get_device_name(device)
    known = [key for key in PEAK_BF16_FLOPS if key in name]
    if not known:
        return None, f"unknown for '{name}' (pass --peak-tflops for an MFU)"
    key = max(known, key=len)
    return PEAK_BF16_FLOPS[key], f"{PEAK_BF16_FLOPS[key] / 1e12:g} TFLOPs dense bf16 ('{key}' data sheet; {name})"


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_path(name: str, path: Callable[[Check], dict], check: Check) -> dict:
    """Run one path: its figures, status ok / failed (with the end of the traceback), seconds and peak memory.
    Environment variables a strategy sets (ranks, ports, seeds) and a process group are undone afterwards."""
    environ = dict(os.environ)
    if check.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(check.device)
    log(f"\n=== {name} ===")
    start = time.perf_counter()
    result: dict = {"path": name}
    try:
        result.update(path(check))
        result.setdefault("status", "ok")
    except Exception as error:  # noqa: BLE001 -- one failing path must not stop the others
        lines = traceback.format_exception(error)
        log("".join(lines).rstrip())
        result.update(status="failed", error=f"{type(error).__name__}: {error}".strip()[:500],
                      traceback="".join(lines)[-3000:])
    finally:
        os.environ.clear()
        os.environ.update(environ)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        gc.collect()
        if check.device.type == "cuda":
            synchronize(check.device)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["peak_mem_gib"] = peak_memory_gib(check.device)
    if check.device.type == "cuda":
        torch.cuda.empty_cache()
    log(f"--- {name}: {result['status']} in {result['seconds']} s " + _figures_text(result))
    return result


def _figures_text(result: dict) -> str:
    parts = []
    for key, fmt in (("images_per_s", "{:.1f} img/s"), ("gflops_per_image", "{:.4g} GFLOPs/img"),
                     ("mfu", "MFU {:.1%}"), ("peak_mem_gib", "peak {:.1f} GiB")):
        if result.get(key) is not None:
            parts.append(fmt.format(result[key]))
    return ", ".join(parts)


# ---------------------------------------------------------------- tiny architectures (--cpu)


def tiny_clip_name(check: Check) -> str:
    """Register (once) open_clip's ViT-L-14-336-quickgelu config with tiny widths and depths; returns its name."""
    if "tiny_clip" not in check.made:
        import open_clip

        config = copy.deepcopy(open_clip.get_model_config("ViT-L-14-336-quickgelu"))
        config["embed_dim"] = 32
        config["vision_cfg"].update(image_size=28, layers=2, width=32, head_width=16, patch_size=14)
        config["text_cfg"].update(context_length=16, width=32, heads=2, layers=1)
        file = check.work / "tiny_models" / f"{TINY_CLIP}.json"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(config))
        open_clip.add_model_config(file)
        check.made["tiny_clip"] = TINY_CLIP
    return check.made["tiny_clip"]


def tiny_dino_dir(check: Check) -> str:
    """timm's local-dir of vit_large_patch14_reg4_dinov2 at tiny widths (config.json names the architecture and
    its arguments); returns the folder."""
    if "tiny_dino" not in check.made:
        import timm
        from timm.models import save_for_hf

        model_args = dict(embed_dim=32, depth=2, num_heads=2, img_size=28)
        model = timm.create_model("vit_large_patch14_reg4_dinov2", pretrained=False, **model_args)
        folder = check.work / "tiny_models" / "dino"
        save_for_hf(model, str(folder), model_args=model_args, safe_serialization=True)
        check.made["tiny_dino"] = str(folder)
    return check.made["tiny_dino"]


# ---------------------------------------------------------------- distillation paths


def distill_config(check: Check, strategy: str, root: Path, teacher_cache: str | None = None) -> dict:
    """radio_b16.yaml for this check: teachers at random init in bf16, toy images, a few steps, one device;
    with --cpu the same recipe at tiny widths and sizes."""
    from mllm.recipes import resolve_config

    args = check.args
    recipe = yaml.safe_load(resolve_config(DISTILL_RECIPE).read_text())
    model, data = recipe["model"], recipe["data"]
    for teacher in model["teachers"]:
        encoder = teacher["init_args"]["encoder"]["init_args"]
        encoder.pop("pretrained", None)  # random init: no weight files on a check machine
        encoder.pop("checkpoint", None)
        teacher["init_args"]["precision"] = "bf16"
    if check.cpu:
        _shrink_distill(check, model, data)
    model["warmup_steps"] = 1
    recipe["trainer"] = {
        "accelerator": check.accelerator, "devices": 1, "strategy": strategy, "precision": "bf16-mixed",
        "max_steps": args.steps, "limit_val_batches": 0, "num_sanity_val_steps": 0, "logger": False,
        "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(root),
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                       "init_args": {"save_last": True, "every_n_train_steps": args.steps}}],
    }
    source_size = 64 if check.cpu else 256  # generated small (cheap), cropped up to data.image_size
    data.update(train={"class_path": "distill.data.ToyImages",
                       "init_args": {"seed": 0, "image_size": source_size, "length": 100_000}},
                val=None, batch_size=args.batch, num_workers=args.workers, teacher_cache=teacher_cache)
    return recipe


def _shrink_distill(check: Check, model: dict, data: dict) -> None:
    """The recipe's families at tiny widths: the CLIP and DINOv2 configs shrunk, SAM 'tiny', a 2-block student."""
    for teacher in model["teachers"]:
        name, encoder = teacher["init_args"]["name"], teacher["init_args"]["encoder"]["init_args"]
        if name == "clip":
            encoder.update(model_name=tiny_clip_name(check))
        elif name == "dino":
            encoder.update(model_name=f"local-dir:{tiny_dino_dir(check)}", image_size=28)
        elif name == "sam":
            encoder.update(variant="tiny")
    model["student"]["init_args"].update(img_size=32, model_args={"embed_dim": 32, "depth": 2, "num_heads": 2})
    model["adaptor_hidden_dim"] = 32
    model["student_size"] = 32
    data["image_size"] = 64  # SAM tiny's native input


def fit(cli_factory: Callable, config: dict, root: Path, check: Check) -> tuple[object, StepMeter]:
    """Write `config` into `root`, build the CLI's model, data module and Trainer from it, and fit with a StepMeter."""
    root.mkdir(parents=True, exist_ok=True)
    file = root / "config.yaml"
    file.write_text(yaml.safe_dump(config, sort_keys=False))
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when sys.argv holds this script's own options
    try:
        cli = cli_factory(["-c", str(file)], run=False)
    finally:
        sys.argv = argv
    meter = StepMeter()
    cli.trainer.callbacks.append(meter)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, meter


def distill_fit(check: Check, name: str, strategy: str, teacher_cache: str | None = None) -> dict:
    from distill.cli import lightning_cli

    root = check.work / name
    config = distill_config(check, strategy, root, teacher_cache)
    cli, meter = fit(lightning_cli, config, root, check)
    ckpt = root / "last.ckpt"
    if ckpt.is_file():
        check.made.setdefault("student_ckpt", ckpt)
    student = config["model"]["student"]["init_args"]
    teachers = ", ".join(f"{t['init_args']['name']} {_encoder_text(t['init_args']['encoder'])}"
                         for t in config["model"]["teachers"])
    return {**meter.figures(check.peak_flops), "batch": config["data"]["batch_size"], "strategy": strategy,
            "what": f"student {student['model_name']} @{config['model'].get('student_size') or student['img_size']} "
                    f"{student.get('model_args') or ''}; teachers {teachers}; data crop {config['data']['image_size']}"}


def _encoder_text(encoder: dict) -> str:
    args = encoder["init_args"]
    return str(args.get("model_name") or args.get("variant")) + (f" @{args['image_size']}" if args.get("image_size") else "")


def distill_online(check: Check) -> dict:
    return distill_fit(check, "distill_online", "auto")


def distill_cached(check: Check) -> dict:
    from distill.cache.cli import main as cache_main

    folder = check.work / "teacher_cache"
    config = distill_config(check, "auto", folder)
    config_file = folder / "config.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    images = 2 * check.args.batch
    device = "cuda" if check.device.type == "cuda" else "cpu"
    synchronize(check.device)
    start = time.perf_counter()
    meta = cache_main(["-c", str(config_file), "--out", str(folder / "cache"), "--images", str(images),
                       "--batch-size", str(check.args.batch), "--workers", str(check.args.workers),
                       "--device", device])
    synchronize(check.device)
    write_s = time.perf_counter() - start
    result = distill_fit(check, "distill_cached", "auto", teacher_cache=str(folder / "cache"))
    result.update(cache_images=meta["images"], cache_write_s=round(write_s, 1),
                  cache_bytes_per_image=round(meta["bytes_per_image"]["targets_on_disk"]))
    return result


def distill_ddp(check: Check) -> dict:
    return distill_fit(check, "distill_ddp", "ddp")


def distill_fsdp(check: Check) -> dict:
    if check.cpu:
        return {"status": "skipped", "error": "Lightning accepts strategy fsdp only on GPUs; run without --cpu"}
    return distill_fit(check, "distill_fsdp", "fsdp")


def student_export(check: Check) -> dict:
    """distill export of the first distillation checkpoint, reloaded two ways and compared with the checkpoint."""
    import timm

    from distill.export import export_student, student_from_checkpoint
    from distill.model import StudentModel

    ckpt = check.made.get("student_ckpt")
    if ckpt is None:
        raise RuntimeError("no distillation checkpoint to export: every distill_* path before this one failed or was "
                           "not run (see their errors)")
    out = check.work / "student_export"
    start = time.perf_counter()
    export_student(ckpt, out, with_adaptors=True)
    write_s = time.perf_counter() - start
    source, _ = student_from_checkpoint(ckpt)
    reloaded = StudentModel.from_export(out)
    plain = timm.create_model(f"local-dir:{out}", pretrained=True)
    source, reloaded, plain = (m.to(check.device).eval() for m in (source, reloaded, plain))
    size = source.model_args["img_size"]
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(check.device)
    with torch.no_grad():
        ours, theirs = source(images), reloaded(images)
        diffs = {"summary": max((ours.summary[k] - theirs.summary[k]).abs().max().item() for k in ours.summary),
                 "adaptors": max(max((a.dense - b.dense).abs().max().item(),
                                     0.0 if a.summary is None else (a.summary - b.summary).abs().max().item())
                                 for a, b in ((ours.adaptors[k], theirs.adaptors[k]) for k in ours.adaptors))}
        normalized = source.conditioner(images) if hasattr(source, "conditioner") else images
        diffs["timm"] = (plain.forward_features(normalized) - source.model.forward_features(normalized)).abs().max().item()
    result = {"export_write_s": round(write_s, 1), "max_abs_diff": diffs, "what": f"{ckpt.parent.name}/last.ckpt"}
    if max(diffs.values()) > 1e-4:
        raise AssertionError(f"reloaded export differs from the checkpoint's student: max abs diffs {diffs}")
    return result


# ---------------------------------------------------------------- LLaVA paths


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def write_random_lm(check: Check, folder: Path, layers: int) -> Path:
    """A random-init Llama of LLaVA-1.5's LM shape (LM_7B; LM_TINY with --cpu) with `layers` layers, in bf16, and
    the toy world's word-level tokenizer, saved in Hugging Face format (what LlavaModule's `lm` loads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.toy.lm import build_toy_tokenizer
    from distill.toy.world import ToyWorld, world_texts

    tokenizer = build_toy_tokenizer(world_texts(ToyWorld(seed=0, image_size=64), 200))
    shape = dict(LM_TINY if check.cpu else LM_7B, num_hidden_layers=layers)
    config = LlamaConfig(**shape, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(check.device), default_dtype(torch.bfloat16):  # built where it is fast to initialise
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    return folder


def lm_folder(check: Check, layers: int, key: str) -> Path:
    """The random LM with `layers` layers, written once per run (shared by the paths that use the same one)."""
    if key not in check.made:
        start = time.perf_counter()
        check.made[key] = write_random_lm(check, check.work / key, layers)
        log(f"wrote a random {layers}-layer LM to {check.made[key]} in {time.perf_counter() - start:.0f} s")
    return check.made[key]


def llava_config(check: Check, recipe_path: str, root: Path, lm: Path, strategy: str, init_from: str | None) -> dict:
    """A LLaVA-1.5 recipe for this check: random-init tower and LM, toy records, a few steps, one device."""
    from mllm.recipes import read_recipe, resolve_config

    args = check.args
    recipe = read_recipe(resolve_config(recipe_path))
    model, data = recipe["model"], recipe["data"]
    encoder = model["tower"]["init_args"]["encoder"]["init_args"]
    encoder.pop("pretrained", None)  # random init
    if check.cpu:
        encoder["model_name"] = tiny_clip_name(check)
        data["image_size"] = 28
        if model.get("lora"):
            model["lora"].update(r=8, alpha=16)
    model.update(lm=str(lm), init_from=init_from)
    stage = model["stage"]
    recipe["trainer"] = {
        "accelerator": check.accelerator, "devices": 1, "strategy": strategy, "precision": "bf16-mixed",
        "max_steps": args.steps, "limit_val_batches": 0, "num_sanity_val_steps": 0, "logger": False,
        "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(root),
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                       "init_args": {"filename": "align" if stage == "align" else "finetune_lora",
                                     "enable_version_counter": False, "every_n_train_steps": args.steps}}],
    }
    data.update(train={"class_path": "mllm.data.ToySource",
                       "init_args": {"seed": 0, "num_images": args.llava_batch * (args.steps + 1), "stage": stage,
                                     "image_size": max(data["image_size"], 64)}},  # ToyWorld draws >= 32 px
                val=None, batch_size=args.llava_batch, num_workers=args.workers)
    return recipe


def llava_fit(check: Check, name: str, recipe_path: str, strategy: str, init_from: str | None) -> dict:
    from mllm.cli import make_cli

    layers = check.args.lm_layers
    lm = lm_folder(check, layers, f"lm_{layers}")
    root = check.work / name
    config = llava_config(check, recipe_path, root, lm, strategy, init_from)
    cli, meter = fit(make_cli, config, root, check)
    shape = LM_TINY if check.cpu else LM_7B
    trained = sum(p.numel() for p in cli.model.parameters() if p.requires_grad)
    return {**meter.figures(check.peak_flops), "batch": check.args.llava_batch, "strategy": strategy,
            "trained_params_m": round(trained / 1e6, 3),
            "what": f"LM hidden {shape['hidden_size']} x {layers} layers (of {shape['num_hidden_layers']}), "
                    f"tower {_encoder_text(config['model']['tower']['init_args']['encoder'])}, "
                    f"{cli.model.model.tower.num_tokens} image tokens, init_from {init_from}"}


def llava_align(check: Check) -> dict:
    result = llava_fit(check, "llava_align", ALIGN_RECIPE, "auto", None)
    ckpt = check.work / "llava_align" / "align.ckpt"
    if ckpt.is_file():
        check.made["align_ckpt"] = str(ckpt)
    return result


def llava_lora(check: Check) -> dict:
    strategy = check.args.lora_strategy
    if check.cpu and strategy == "fsdp":
        strategy = "auto"  # Lightning refuses FSDP on the CPU
    return llava_fit(check, "llava_lora", LORA_RECIPE, strategy, check.made.get("align_ckpt"))


def llava_export(check: Check) -> dict:
    """mllm.hf_export.export_model of a LoRA-finetune LlavaModule (adapters merged), reloaded with transformers:
    tower tokens and LM logits compared in fp32 on the device."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from distill.encoders import OpenClipEncoder
    from mllm.hf_export import export_model
    from mllm.loading import load_tokenizer
    from mllm.module import LlavaModule, LoraOptions
    from mllm.towers import SingleEncoderTower

    layers = check.args.export_lm_layers
    lm = lm_folder(check, layers, f"lm_{layers}")
    clip = tiny_clip_name(check) if check.cpu else "ViT-L-14-336-quickgelu"
    torch.manual_seed(0)
    module = LlavaModule(SingleEncoderTower(OpenClipEncoder(clip, layer=-2)), lm=str(lm), stage="finetune",
                         lora=LoraOptions(r=8, alpha=16, dropout=0.0))
    with torch.no_grad():  # non-zero adapters, so merging them changes the weights
        for name, p in module.model.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    out = check.work / "llava_export"
    start = time.perf_counter()
    tokenizer = load_tokenizer(str(lm))
    export_model(module.model, tokenizer, str(out), chat_template="vicuna_v1", pad_to_square=True)  # the LoRA recipe's
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    hf = LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).to(check.device).eval()
    processor = AutoProcessor.from_pretrained(str(out))
    reload_s = time.perf_counter() - start
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                           add_generation_prompt=True)
    if not prompt.endswith("USER: <image>\nhi ASSISTANT:"):
        raise AssertionError(f"the exported processor renders {prompt!r}, not LLaVA's vicuna_v1 prompt")
    model = module.model.float().to(check.device).eval()  # the LM is merged in place by the export
    size = model.tower.input_size[0]
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(check.device)
    # text ids below the tokenizer's size: the export's <image> id comes right after them
    ids = torch.randint(3, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0)).to(check.device)
    with torch.no_grad():
        ours = model.tower(pixels)
        hidden = hf.model.vision_tower(model.tower.encoder.preprocess(pixels), output_hidden_states=True)
        theirs = hidden.hidden_states[hf.config.vision_feature_layer][:, 1:]
        ours_logits = model.lm(input_ids=ids).logits
        theirs_logits = hf(input_ids=ids).logits[..., :ours_logits.shape[-1]]
    diffs = {"tower": (ours - theirs).abs().max().item(), "lm_logits": (ours_logits - theirs_logits).abs().max().item()}
    result = {"export_write_s": round(write_s, 1), "reload_s": round(reload_s, 1), "max_abs_diff": diffs,
              "what": f"LM {layers} layers, LoRA r 8 merged, tower {clip}, chat template vicuna_v1"}
    if max(diffs.values()) > 1e-3:
        raise AssertionError(f"reloaded Llava export differs from unitower's model: max abs diffs {diffs}")
    return result


PATH_FUNCTIONS: dict[str, Callable[[Check], dict]] = {
    "distill_online": distill_online, "distill_cached": distill_cached, "distill_ddp": distill_ddp,
    "distill_fsdp": distill_fsdp, "student_export": student_export, "llava_align": llava_align,
    "llava_lora": llava_lora, "llava_export": llava_export,
}


# ---------------------------------------------------------------- report


def table(results: list[dict]) -> str:
    def cell(value, fmt: str) -> str:
        return "-" if value is None else fmt.format(value)

    rows = [f"{'path':<16}{'status':<9}{'img/s':>9}{'GFLOP/img':>11}{'MFU':>8}{'peak GiB':>10}{'s':>7}"]
    for r in results:
        rows.append(f"{r['path']:<16}{r['status']:<9}{cell(r.get('images_per_s'), '{:.1f}'):>9}"
                    f"{cell(r.get('gflops_per_image'), '{:.4g}'):>11}{cell(r.get('mfu'), '{:.1%}'):>8}"
                    f"{cell(r.get('peak_mem_gib'), '{:.1f}'):>10}{cell(r.get('seconds'), '{:.0f}'):>7}")
        if r.get("error"):
            rows.append(f"{'':<16}{r['error'].splitlines()[0][:200]}")
    return "\n".join(rows)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny widths / depths / LM and few steps, on the CPU")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS), help="the paths to run, in order")
    parser.add_argument("--budget-s", type=float, default=480.0, help="no path starts after this many seconds")
    parser.add_argument("--out", default="runs/gpu_check", help="folder of results.json")
    parser.add_argument("--work", default=None, help="folder for checkpoints, caches and LMs (default: a temp "
                        "folder under --out, removed at the end; the 32-layer LM takes 13.5 GB)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per fit (default 6, --cpu 3); the "
                        "first is counted (FLOPs), the rest timed")
    parser.add_argument("--batch", type=int, default=None, help="distillation images per step (default 16, --cpu 2)")
    parser.add_argument("--llava-batch", type=int, default=None, help="LLaVA samples per step (default 8, --cpu 2)")
    parser.add_argument("--lm-layers", type=int, default=None, help="layers of the 7B-shaped LM (default 32, --cpu 2)")
    parser.add_argument("--export-lm-layers", type=int, default=None,
                        help="layers of llava_export's LM (default 2: the export builds and writes it in fp32 on the CPU)")
    parser.add_argument("--lora-strategy", default="auto", help="Lightning strategy of llava_lora (the recipe: fsdp)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 6, --cpu 0)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOPs of the device (MFU)")
    args = parser.parse_args(argv)
    defaults = {"steps": 3 if args.cpu else 6, "batch": 2 if args.cpu else 16, "llava_batch": 2 if args.cpu else 8,
                "lm_layers": 2 if args.cpu else 32, "export_lm_layers": 2, "workers": 0 if args.cpu else 6}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is counted, the others timed)")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    from distill.common.io import save_json

    args = parse(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run with --cpu for the tiny CPU version.")
    device = torch.device("cpu" if args.cpu else "cuda")
    peak, peak_text = device_peak_flops(device, args.peak_tflops)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="work-", dir=out))
    work.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log(f"gpu_check on {name} ({'--cpu: tiny sizes' if args.cpu else 'real sizes'}); torch {torch.__version__}; "
        f"peak assumed: {peak_text}; budget {args.budget_s:.0f} s; steps {args.steps}, distill batch {args.batch}, "
        f"LLaVA batch {args.llava_batch}, LM layers {args.lm_layers} (export {args.export_lm_layers})")
    check = Check(args, work, device, peak)
    started = time.perf_counter()
    results = []
    try:
        for path in args.paths:
            if time.perf_counter() - started >= args.budget_s:
                results.append({"path": path, "status": "skipped", "error": f"not started: --budget-s {args.budget_s:g} used"})
                continue
            results.append(run_path(path, PATH_FUNCTIONS[path], check))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - started
    log(f"\n{table(results)}\ntotal {total:.0f} s; peak assumed: {peak_text}")
    report = {"device": name, "cpu": args.cpu, "peak_flops": peak, "peak_source": peak_text, "seconds": round(total, 1),
              "options": {k: v for k, v in vars(args).items()}, "results": results}
    save_json(report, out / "results.json")
    log(f"wrote {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
