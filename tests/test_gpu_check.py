"""scripts/gpu_check.py: the CPU run of every path (about 25 s on 2 cores) and of one path, the step meter's counts inside a real
Trainer, the peak-FLOPs table, a failing path that does not stop the others, and the time budget."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # its dataclass looks its module up there
spec.loader.exec_module(gpu_check)


def by_path(results: list[dict]) -> dict[str, dict]:
    return {r["path"]: r for r in results}


def test_cpu_run_of_every_path(tmp_path):
    results = by_path(gpu_check.main(["--cpu", "--out", str(tmp_path)]))
    assert list(results) == list(gpu_check.PATHS)
    assert results["distill_fsdp"]["status"] == "skipped" and "GPU" in results["distill_fsdp"]["error"]
    for name, result in results.items():
        assert name == "distill_fsdp" or result["status"] == "ok", (name, result.get("traceback"))
    for name in ("distill_online", "distill_cached", "distill_ddp", "llava_align", "llava_lora"):
        assert results[name]["images_per_s"] > 0 and results[name]["gflops_per_image"] > 0
        assert results[name]["steps_timed"] == 2 and results[name]["mfu"] is None  # no peak known on a CPU
    # the cached fit runs no teacher: its counted FLOPs are the student's alone
    assert results["distill_cached"]["gflops_per_image"] < 0.2 * results["distill_online"]["gflops_per_image"]
    assert results["distill_ddp"]["gflops_per_image"] == results["distill_online"]["gflops_per_image"]
    assert results["distill_cached"]["cache_images"] == 4
    assert results["llava_lora"]["what"].endswith("llava_align/align.ckpt")
    assert max(results["student_export"]["max_abs_diff"].values()) < 1e-5
    assert max(results["llava_export"]["max_abs_diff"].values()) < 1e-4
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["path"] for r in saved["results"]] == list(gpu_check.PATHS) and saved["cpu"] is True
    assert not list(tmp_path.glob("work-*"))  # the work folder is removed


def test_cpu_run_of_one_path(tmp_path):
    results = gpu_check.main(["--cpu", "--out", str(tmp_path), "--paths", "distill_online", "student_export"])
    online, export = results
    assert online["status"] == "ok", online.get("traceback")
    assert online["images_per_s"] > 0 and online["gflops_per_image"] > 0 and online["batch"] == 2
    assert export["status"] == "ok", export.get("traceback")
    assert set(export["max_abs_diff"]) == {"summary", "adaptors", "timm"}
    assert max(export["max_abs_diff"].values()) < 1e-5


class _Linear(L.LightningModule):
    """One bias-free Linear(8 -> 4) on batches of 3 images [3, 8]."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 4, bias=False)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.rand(12, 8), batch_size=3)


def test_step_meter_counts_the_first_step_and_times_the_others(tmp_path):
    meter = gpu_check.StepMeter()
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[meter],
                        default_root_dir=tmp_path)
    trainer.fit(_Linear())
    # forward: 2 * 3 * 8 * 4 = 192; backward: the weight gradient only (the batch needs none), 192 more
    assert meter.flops == 384 and meter.flops_images == 3
    assert len(meter.seconds) == 3 and meter.images == [3, 3, 3]
    assert torch.inference_mode is not None and torch.inference_mode().__class__.__name__ == "inference_mode"


def test_step_meter_figures():
    meter = gpu_check.StepMeter()
    meter.flops, meter.flops_images = 4_000_000_000, 2
    meter.seconds, meter.images = [0.5, 0.5], [2, 2]
    figures = meter.figures(peak_flops=16e9)
    assert figures == {"steps_timed": 2, "images_per_s": 4.0, "gflops_per_image": 2.0, "mfu": 0.5}
    assert gpu_check.StepMeter().figures(16e9)["images_per_s"] is None


def test_peak_flops_of_known_and_unknown_devices(monkeypatch):
    cuda = torch.device("cuda")
    for name, peak in (("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert gpu_check.device_peak_flops(cuda, None)[0] == peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    assert gpu_check.device_peak_flops(cuda, None)[0] is None
    assert gpu_check.device_peak_flops(cuda, 100.0)[0] == 100e12
    assert gpu_check.device_peak_flops(torch.device("cpu"), None)[0] is None


def test_a_failing_path_is_reported_and_the_others_run(tmp_path, monkeypatch):
    def failing(check):
        os.environ["LOCAL_RANK"] = "0"  # as a strategy's launcher does; undone after the path
        raise ValueError("teacher 'sam' exploded")

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setitem(gpu_check.PATH_FUNCTIONS, "distill_online", failing)
    monkeypatch.setitem(gpu_check.PATH_FUNCTIONS, "distill_cached", lambda check: {"images_per_s": 2.0})
    results = gpu_check.main(["--cpu", "--out", str(tmp_path), "--paths", "distill_online", "distill_cached"])
    failed, ok = results
    assert failed["status"] == "failed" and failed["error"] == "ValueError: teacher 'sam' exploded"
    assert "in failing" in failed["traceback"] and "LOCAL_RANK" not in os.environ
    assert ok["status"] == "ok" and ok["images_per_s"] == 2.0
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["status"] == "failed"


def test_no_path_starts_once_the_budget_is_used(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.PATH_FUNCTIONS, "distill_online", lambda check: pytest.fail("must not start"))
    (result,) = gpu_check.main(["--cpu", "--out", str(tmp_path), "--paths", "distill_online", "--budget-s", "0"])
    assert result["status"] == "skipped" and "budget" in result["error"]


def test_options_per_mode():
    cpu, gpu = gpu_check.parse(["--cpu"]), gpu_check.parse([])
    assert (cpu.steps, cpu.batch, cpu.lm_layers, cpu.workers) == (3, 2, 2, 0)
    assert (gpu.steps, gpu.batch, gpu.lm_layers, gpu.budget_s) == (6, 16, 32, 480.0)
    assert gpu.paths == list(gpu_check.PATHS)
