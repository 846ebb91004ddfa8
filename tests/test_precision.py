"""Precision chosen per machine (distill/common/precision.py): the decision from injected measurements, the
/proc/cpuinfo parsing, `trainer.precision: auto` through the CLI, and the teachers' autocast."""

from __future__ import annotations

import pytest
import torch

from distill.common import precision as P

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile
processor\t: 1
model name\t: other
flags\t\t: fpu
"""


def test_cpuinfo_flags_and_name_of_first_processor():
    name, flags = P.parse_cpuinfo(CPUINFO)
    assert name == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"avx512_bf16", "amx_bf16", "avx2"} <= flags and "fpu" in flags and len(flags) == 7
    assert P.parse_cpuinfo("Features\t: fp asimd bf16\n") == ("unknown CPU", frozenset({"fp", "asimd", "bf16"}))
    assert P.cpu_info("/nonexistent/cpuinfo") == ("unknown CPU", frozenset())


def test_cpu_bf16_chosen_only_when_measured_faster():
    name, flags = P.parse_cpuinfo(CPUINFO)
    fast = P.decide("cpu", P.Speedups(forward=2.9, train=2.1, screen=3.0), cpu_name=name, cpu_flags=flags)
    assert (fast.trainer, fast.teacher, fast.teacher_dtype) == ("bf16-mixed", "bf16", torch.bfloat16)
    assert "Xeon(R) Platinum 8480+" in fast.reason and "amx_bf16,avx512_bf16" in fast.reason
    assert "forward 2.90x" in fast.reason and "forward+backward 2.10x" in fast.reason

    # the AMD EPYC without bf16 units: bf16 matmuls ~480x slower; flags alone never decide
    slow = P.decide("cpu", P.Speedups(forward=0.002, train=0.002, screen=0.002), cpu_name="AMD EPYC",
                    cpu_flags=frozenset({"avx2"}))
    assert (slow.trainer, slow.teacher, slow.teacher_dtype) == ("32-true", "fp32", None)
    assert "AMD EPYC" in slow.reason and "no avx512_bf16/amx_bf16 flag" in slow.reason and "0.00x" in slow.reason

    # forward faster but training not (or the reverse): each side decides on its own measurement
    mixed = P.decide("cpu", P.Speedups(forward=1.3, train=1.05))
    assert (mixed.trainer, mixed.teacher) == ("32-true", "bf16")
    assert P.decide("cpu", P.Speedups(forward=1.09, train=1.1)).trainer == "bf16-mixed"  # threshold is inclusive
    assert P.decide("cpu", P.Speedups(forward=1.09, train=1.1)).teacher == "fp32"
    assert P.decide("cpu", None).trainer == "32-true"  # nothing measured: fp32


def test_cuda_decision_follows_bf16_support():
    assert P.decide("cuda", cuda_bf16=True).trainer == "bf16-mixed"
    assert P.decide("cuda", cuda_bf16=True).teacher == "bf16"
    old = P.decide("cuda", cuda_bf16=False)
    assert (old.trainer, old.teacher) == ("32-true", "fp32") and "16-mixed" in old.reason
    with pytest.raises(ValueError, match="'cpu' and 'cuda'"):
        P.decide("mps")


def test_measurement_returns_ratios_and_skips_the_block_when_the_screen_is_slow():
    speed = P.measure_cpu_bf16(seconds=0.02)
    assert speed.forward > 0 and speed.train > 0 and speed.screen > 0
    # a screen floor no ratio can reach: the ViT block is not timed, the screen ratio stands for both
    skipped = P.measure_cpu_bf16(seconds=0.02, screen_floor=1e9)
    assert skipped.forward == skipped.train == skipped.screen


def _fixed(trainer: str, teacher: str):
    calls = []

    def choose(device: str) -> P.PrecisionChoice:
        calls.append(device)
        return P.PrecisionChoice(device, trainer, teacher, "injected")

    return choose, calls


def test_resolve_trainer_precision():
    choose, calls = _fixed("bf16-mixed", "bf16")
    assert P.resolve_trainer_precision("auto", "cpu", choose) == "bf16-mixed" and calls == ["cpu"]
    assert P.resolve_trainer_precision("32-true", "cpu", choose) == "32-true"
    assert P.resolve_trainer_precision(None, "cpu", choose) is None and calls == ["cpu"]  # only "auto" measures
    if not torch.cuda.is_available():
        assert P.auto_device("auto") == "cpu"
        with pytest.raises(ValueError, match="no CUDA device"):
            P.auto_device("gpu")


def test_trainer_precision_auto_through_the_cli(monkeypatch, tmp_path):
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    from distill.cli import UnitowerCLI

    choose, calls = _fixed("bf16-mixed", "bf16")
    monkeypatch.setattr(P, "choose_precision", choose)
    args = ["--trainer.precision", "auto", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path)]
    cli = UnitowerCLI(BoringModel, BoringDataModule, args=args, run=False)
    assert calls == ["cpu"] and cli.trainer.precision == "bf16-mixed"
    assert type(cli.trainer.precision_plugin).__name__ == "MixedPrecision"
    cli = UnitowerCLI(BoringModel, BoringDataModule, run=False,
                      args=["--trainer.precision", "32-true", "--trainer.default_root_dir", str(tmp_path)])
    assert calls == ["cpu"] and cli.trainer.precision == "32-true"
    with pytest.raises(SystemExit):  # other strings are still rejected by the parser
        UnitowerCLI(BoringModel, BoringDataModule, run=False, args=["--trainer.precision", "fast"])


class Probe(torch.nn.Module):
    """Records the autocast state its forward ran under."""

    def __init__(self) -> None:
        super().__init__()
        self.summary_dim, self.dense_dim = 2, 2
        self.input_size = (4, 4)
        self.seen = []

    def freeze(self):
        return self

    def forward(self, images):
        from distill.encoders.base import EncoderOutput

        self.seen.append((torch.is_autocast_enabled("cpu"), torch.is_inference_mode_enabled()))
        x = torch.nn.functional.linear(images.mean((2, 3))[:, :2], torch.eye(2))
        return EncoderOutput(summary=x, dense=x[:, :, None, None])


@pytest.mark.parametrize("measured, expected", [("bf16", True), ("fp32", False)])
def test_teacher_auto_precision_follows_the_measurement(monkeypatch, measured, expected):
    from distill.teacher import Teacher

    choose, _ = _fixed("32-true", measured)
    monkeypatch.setattr(P, "choose_precision", choose)
    teacher = Teacher("probe", Probe(), precision="auto")
    teacher._cpu_dtype = torch.bfloat16  # the per-teacher check (timed, so not asserted here) agreed
    # fp32 also switches off an enclosing bf16 autocast (a bf16-mixed student step)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = teacher.targets(torch.rand(2, 3, 4, 4))
    assert teacher.encoder.seen == [(expected, True)]
    assert out.summary.dtype == torch.float32 and not out.summary.is_inference()
    assert out.dense.dtype == torch.float32


def test_teacher_explicit_precision():
    from distill.teacher import Teacher

    assert Teacher("probe", Probe()).precision == "fp32"  # the default: reproducible across processes
    assert P.teacher_autocast_dtype("fp32", "cpu") is None
    assert P.teacher_autocast_dtype("bf16", "cpu") is torch.bfloat16
    teacher = Teacher("probe", Probe(), precision="bf16")
    teacher.targets(torch.rand(1, 3, 4, 4))
    assert teacher.encoder.seen == [(True, True)]
    with pytest.raises(ValueError, match="precision must be one of"):
        Teacher("probe", Probe(), precision="fp16")


def test_choice_is_exported_to_later_processes_and_can_be_pinned(monkeypatch):
    monkeypatch.setenv(P.CHOICE_ENV, "")  # unset for the choice; restored after the test
    P.choose_precision.cache_clear()
    monkeypatch.setattr(P, "measure_cpu_bf16", lambda: P.Speedups(forward=2.0, train=0.5))
    try:
        choice = P.choose_precision("cpu")
        assert (choice.trainer, choice.teacher) == ("32-true", "bf16")
        assert P.os.environ[P.CHOICE_ENV] == "32-true,bf16"  # a DDP rank started now inherits this
        P.choose_precision.cache_clear()
        monkeypatch.setattr(P, "measure_cpu_bf16", lambda: pytest.fail("a pinned choice is not measured again"))
        assert P.choose_precision("cpu") == P.PrecisionChoice("cpu", "32-true", "bf16", choice_reason())
        monkeypatch.setenv(P.CHOICE_ENV, "bf16-mixed,fp16")
        P.choose_precision.cache_clear()
        with pytest.raises(ValueError, match="UNITOWER_PRECISION_CHOICE='bf16-mixed,fp16'"):
            P.choose_precision("cpu")
    finally:
        P.choose_precision.cache_clear()


def choice_reason() -> str:
    return "precision auto: student 32-true, teachers bf16 (UNITOWER_PRECISION_CHOICE=32-true,bf16)"


def test_teacher_auto_keeps_fp32_when_its_own_bf16_run_is_slower(monkeypatch):
    from distill.teacher import Teacher

    class SlowInBf16(Probe):
        def forward(self, images):
            if torch.is_autocast_enabled("cpu"):
                time.sleep(0.05)  # stands in for a model whose CPU bf16 kernels are slow
            return super().forward(images)

    import time

    choose, _ = _fixed("bf16-mixed", "bf16")  # the probe block said bf16 is faster
    monkeypatch.setattr(P, "choose_precision", choose)
    teacher = Teacher("slow", SlowInBf16(), precision="auto")
    teacher.targets(torch.rand(2, 3, 4, 4))
    assert teacher._cpu_dtype is None and teacher.encoder.seen[-1] == (False, True)
    assert len(teacher.encoder.seen) == 5  # 4 timing runs on the first batch, then the batch in fp32
