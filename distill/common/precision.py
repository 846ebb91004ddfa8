"""Choose the numeric precision per machine: bf16 only where this machine runs it faster.

    choice = choose_precision("cpu")        # measured once per process and device, then cached
    choice.trainer   # "bf16-mixed" or "32-true" (a Lightning `trainer.precision`)
    choice.teacher   # "bf16" or "fp32" (autocast dtype of frozen teachers' forward passes)
    print(choice.reason)

On CUDA: bf16 autocast when the GPU supports bf16 (`torch.cuda.is_bf16_supported()`), else fp32.
On CPU: bf16 runs at full speed only with bf16 units (AVX512_BF16 / AMX); without them oneDNN emulates
it and a step gets several times *slower*. So a small ViT block (ViT-S width, 128 tokens) is timed in
fp32 and under bf16 autocast, interleaved, for a fraction of a second each: forward-only for the teachers,
forward+backward for the student (`trainer`). bf16 is chosen only when its best time is at least
`MIN_SPEEDUP` times faster (best, not median: on a shared machine other processes only add time). A quick
single-matmul screen first skips the block timing where bf16 is clearly slow (on such CPUs one bf16
block can take seconds). The measurement runs with the process's torch thread count, as training will. The CPU's model name and its bf16 flags
(/proc/cpuinfo) are printed in the one log line next to the measured ratios.

`trainer.precision: auto` in a distill / mllm config resolves through `resolve_trainer_precision`;
`Teacher(precision="auto")` through `teacher_autocast_dtype`.

The choice is measured once per process and exported to the environment (CHOICE_ENV), so processes
started afterwards (Lightning's DDP ranks, which re-run the command) take the same choice instead of
measuring again; set that variable yourself (e.g. `UNITOWER_PRECISION_CHOICE=32-true,fp32`) to pin it.
A new run measures again: `auto` is machine-dependent by design, so pin explicit precisions where runs
on different machines (or a resume after a machine change) must match bit for bit.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MIN_SPEEDUP = 1.1  # bf16 must be at least this much faster (fp32 time / bf16 time) to be chosen
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 units
AUTO = "auto"
CHOICE_ENV = "UNITOWER_PRECISION_CHOICE"  # "<trainer precision>,<teacher precision>", e.g. "bf16-mixed,bf16"
TEACHER_PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Speedups:
    """Measured fp32 time / bf16 time (> 1: bf16 faster) of the probe workload; None = not measured."""

    forward: float | None
    train: float | None
    screen: float | None = None  # the single-matmul screen


@dataclass(frozen=True)
class PrecisionChoice:
    """What to run in, and why (one human-readable line)."""

    device: str  # "cpu" or "cuda"
    trainer: str  # Lightning trainer.precision: "bf16-mixed" or "32-true"
    teacher: str  # "bf16" or "fp32"
    reason: str

    @property
    def teacher_dtype(self) -> torch.dtype | None:
        """Autocast dtype for teacher forward passes, None for plain fp32."""
        return torch.bfloat16 if self.teacher == "bf16" else None


def cpu_info(path: str = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first CPU in `path`; ("unknown CPU", {}) where the file does not exist."""
    name, flags = "unknown CPU", frozenset()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return name, flags
    return parse_cpuinfo(text)


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor block of a /proc/cpuinfo text (x86 'flags', arm 'Features')."""
    name, flags = "unknown CPU", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and name == "unknown CPU":
            name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return name, flags


def decide(
    device: str,
    speedups: Speedups | None = None,
    cuda_bf16: bool = False,
    cpu_name: str = "unknown CPU",
    cpu_flags: frozenset[str] = frozenset(),
    min_speedup: float = MIN_SPEEDUP,
) -> PrecisionChoice:
    """The decision, from already measured facts (pure: tests inject the measurements).

    Args:
        device: "cpu" or "cuda".
        speedups: measured fp32/bf16 time ratios on this CPU (ignored on CUDA).
        cuda_bf16: whether the GPU supports bf16.
        cpu_name, cpu_flags: from /proc/cpuinfo, only reported.
        min_speedup: bf16 is chosen when the measured ratio is >= this.
    """
    if device == "cuda":
        if cuda_bf16:
            return PrecisionChoice("cuda", "bf16-mixed", "bf16", "precision auto: bf16-mixed on CUDA (the GPU supports bf16)")
        return PrecisionChoice("cuda", "32-true", "fp32",
                               "precision auto: fp32 on CUDA (no bf16 support; set trainer.precision: 16-mixed to try fp16)")
    if device != "cpu":
        raise ValueError(f"precision auto supports 'cpu' and 'cuda' devices, got {device!r}")
    speedups = speedups or Speedups(None, None)
    units = sorted(f for f in BF16_CPU_FLAGS if f in cpu_flags)
    units_text = f"bf16 flags: {','.join(units)}" if units else "no avx512_bf16/amx_bf16 flag"

    def pick(ratio: float | None) -> bool:
        return ratio is not None and ratio >= min_speedup

    def fmt(ratio: float | None) -> str:
        return "not measured" if ratio is None else f"{ratio:.2f}x"

    trainer = "bf16-mixed" if pick(speedups.train) else "32-true"
    teacher = "bf16" if pick(speedups.forward) else "fp32"
    screen = "" if speedups.screen is None else f", matmul screen {fmt(speedups.screen)}"
    reason = (
        f"precision auto: student {trainer}, teachers {teacher} on CPU '{cpu_name}' ({units_text}); "
        f"measured bf16 speedup over fp32: forward {fmt(speedups.forward)}, forward+backward {fmt(speedups.train)}"
        f"{screen}; bf16 needs >= {min_speedup:.2f}x"
    )
    return PrecisionChoice("cpu", trainer, teacher, reason)


def _probe_block(dim: int = 384, tokens: int = 128, heads: int = 6, seed: int = 0):
    """A pre-norm ViT block (qkv, SDPA attention, proj, 4x MLP) as a function of x, with its weights."""
    gen = torch.Generator().manual_seed(seed)
    w = {
        name: (torch.randn(*shape, generator=gen) * 0.02).requires_grad_()
        for name, shape in {"qkv": (3 * dim, dim), "proj": (dim, dim), "fc1": (4 * dim, dim), "fc2": (dim, 4 * dim)}.items()
    }
    x = torch.randn(2, tokens, dim, generator=gen)

    def block(x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = F.linear(F.layer_norm(x, (d,)), w["qkv"]).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(attn, w["proj"])
        return x + F.linear(F.gelu(F.linear(F.layer_norm(x, (d,)), w["fc1"])), w["fc2"])

    return block, x, list(w.values())


def _interleaved_ratio(run_fp32: Callable[[], None], run_bf16: Callable[[], None], seconds: float, min_reps: int = 3) -> float:
    """Best time of run_fp32 / best time of run_bf16, alternating them until `seconds` have passed.

    The best (minimum) rather than the median: on a shared machine other processes only add time."""
    for _ in range(2):  # warm-up (oneDNN kernel selection / JIT)
        run_fp32(), run_bf16()
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    deadline = time.perf_counter() + seconds
    while min(len(t) for t in times.values()) < min_reps or time.perf_counter() < deadline:
        for key, fn in (("fp32", run_fp32), ("bf16", run_bf16)):
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
        if len(times["fp32"]) >= 50:
            break
    return min(times["fp32"]) / min(times["bf16"])


def measure_cpu_bf16(seconds: float = 0.5, screen_floor: float = 0.25) -> Speedups:
    """Time fp32 vs bf16 autocast on this CPU: a matmul screen, then a ViT block forward and forward+backward.

    When the screen shows bf16 slower than `screen_floor` x fp32 the block is not timed (bf16 is lost anyway)."""
    a, b = torch.randn(256, 768), torch.randn(768, 768)

    def matmul(dtype: torch.dtype | None) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                a @ b
        return run

    screen = _interleaved_ratio(matmul(None), matmul(torch.bfloat16), seconds / 4)
    if screen < screen_floor:
        return Speedups(forward=screen, train=screen, screen=screen)
    block, x, weights = _probe_block()

    def forward(bf16: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                block(x)
        return run

    def train(bf16: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = block(x).float().square().mean()
            torch.autograd.grad(loss, weights)
        return run

    return Speedups(
        forward=_interleaved_ratio(forward(False), forward(True), seconds),
        train=_interleaved_ratio(train(False), train(True), seconds),
        screen=screen,
    )


def choice_from_env(device: str, value: str | None = None) -> PrecisionChoice | None:
    """The choice pinned in CHOICE_ENV ("<trainer>,<teacher>"), or None when unset."""
    value = os.environ.get(CHOICE_ENV) if value is None else value
    if not value:
        return None
    trainer, _, teacher = value.partition(",")
    if trainer not in ("bf16-mixed", "32-true") or teacher not in ("bf16", "fp32"):
        raise ValueError(f"{CHOICE_ENV}={value!r}: expected '<bf16-mixed|32-true>,<bf16|fp32>', e.g. '32-true,fp32'.")
    return PrecisionChoice(device, trainer, teacher, f"precision auto: student {trainer}, teachers {teacher} ({CHOICE_ENV}={value})")


@functools.lru_cache(maxsize=None)
def choose_precision(device: str = "cpu") -> PrecisionChoice:
    """Measure (CPU) or query (CUDA) once per process and device, log the one-line reason, return the choice.

    A choice already in CHOICE_ENV (pinned, or exported by the parent process) is taken as is; a measured
    one is exported there for the processes started later."""
    device = torch.device(device).type
    pinned = choice_from_env(device)
    if pinned is not None:
        log.warning(pinned.reason)
        return pinned
    if device == "cuda":
        choice = decide("cuda", cuda_bf16=torch.cuda.is_bf16_supported())
    else:
        name, flags = cpu_info()
        choice = decide("cpu", measure_cpu_bf16(), cpu_name=name, cpu_flags=flags)
    log.warning(choice.reason)
    os.environ[CHOICE_ENV] = f"{choice.trainer},{choice.teacher}"
    return choice


def auto_device(accelerator: object) -> str:
    """The device a Lightning `trainer.accelerator` value will train on: "cuda" or "cpu"."""
    text = str(accelerator or "auto").lower()
    if text == "cpu":
        return "cpu"
    if text in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return "cuda"
    if text in ("gpu", "cuda"):
        raise ValueError(f"trainer.accelerator is {accelerator!r} but no CUDA device is available.")
    return "cpu"  # auto without CUDA (mps / other accelerators: keep fp32 by measuring the CPU)


def resolve_trainer_precision(value: object, accelerator: object = "auto",
                              choose: Callable[[str], PrecisionChoice] | None = None) -> object:
    """`trainer.precision`: "auto" becomes the measured choice for the trainer's device; anything else passes."""
    if value != AUTO:
        return value
    return (choose or choose_precision)(auto_device(accelerator)).trainer


def teacher_autocast_dtype(precision: str, device: torch.device | str,
                           choose: Callable[[str], PrecisionChoice] | None = None) -> torch.dtype | None:
    """Autocast dtype of a frozen teacher's forward: None = fp32. `precision` is one of TEACHER_PRECISIONS."""
    if precision not in TEACHER_PRECISIONS:
        raise ValueError(f"teacher precision must be one of {TEACHER_PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda"):
        return None
    return (choose or choose_precision)(device_type).teacher_dtype
