"""Distillation speed, measured side by side in one process on random-init real architectures (issue 12).

    PYTHONPATH=$PWD python scripts/bench_distill.py --quick          # smoke run: ~2 minutes on a 2-core CPU
    PYTHONPATH=$PWD python scripts/bench_distill.py                  # student ViT-S/16 @224, CLIP ViT-B/16 + DINOv2-S @224, batch 4

Prints the CPU model and flags, the precision `auto` chooses here (and why), then times interleaved repetitions
(median and range, seconds per step) of:
    naive        a hand-written fp32 loop: student fwd, every teacher under no_grad in fp32, heads, losses, AdamW
    online_fp32  the project's step (DistillModule.teacher_losses) with teachers and student in fp32
    online       the project's step at the chosen precision (trainer autocast + teacher precision auto)
    student_only the student's fwd+bwd+AdamW alone (chosen precision)
    cached       the step with teacher targets computed beforehand and held in memory (chosen precision)
and the ratios online / naive (goal <= 0.67), online / online_fp32 (never > 1), cached / student_only (goal <= 1.15).
Then exact FLOPs per model (mllm.study.cost.count_flops vs torch's plain counter), SAM's per-image time at
batch 1 vs 4 (whole batch vs chunks of 1, as SamEncoder runs it on CPU), and the teacher-feature cache's
bytes per image vs Theia's bf16 layout with its held-out reconstruction cosine (distill.cache.measure).

    PYTHONPATH=$PWD python scripts/bench_distill.py --students vit_tiny_patch16_224 vit_small_patch16_224 vit_small_patch16_224

`--students A B C` (issue 19 item 4) instead times, interleaved, one online step of a DistillModule with the three
students (model.student + model.students: one teacher pass feeds all) against three single-student online steps
(the teachers run once per student), and prints the ratio (goal <= 0.5).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from typing import Callable

import numpy as np
import torch

from distill import losses
from distill.cache.measure import cache_report as measure_cache
from distill.cache.measure import format_report
from distill.encoders import OpenClipEncoder, TimmEncoder
from distill.model import StudentModel
from distill.module import DistillModule
from distill.common.precision import BF16_CPU_FLAGS, choose_precision, cpu_info
from distill.students import StudentSpec
from distill.teacher import Teacher
from distill.toy.world import HELDOUT_SEED, ToyWorld
from mllm.study.cost import count_flops

INTERESTING_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8", "fma")


def log(msg: str) -> None:
    print(msg, flush=True)


def build(args) -> tuple[DistillModule, list[Teacher]]:
    log(f"building random-init models: student {args.student} @{args.size}, teachers CLIP {args.clip} + "
        f"{args.dino} @{args.teacher_size} ...")
    teachers = [
        Teacher("clip", OpenClipEncoder(args.clip, image_size=args.teacher_size)),
        Teacher("dino", TimmEncoder(args.dino, image_size=args.teacher_size, crop_pct=1.0)),
    ]
    student = StudentModel(args.student, summary_names=["clip", "dino"], num_registers=2, img_size=args.size)
    module = DistillModule(student, teachers, adaptor_hidden_dim=args.adaptor_hidden)
    module.log = lambda *a, **k: None  # outside a Trainer
    module.train()
    return module, teachers


def multi_student_section(args, images: torch.Tensor) -> None:
    """One online step feeding every student of `args.students` from one teacher pass vs one single-student online
    step per student (each running the teachers), fp32, interleaved; prints the median times and their ratio."""
    teachers = [
        Teacher("clip", OpenClipEncoder(args.clip, image_size=args.teacher_size)),
        Teacher("dino", TimmEncoder(args.dino, image_size=args.teacher_size, crop_pct=1.0)),
    ]

    def student(name: str) -> StudentModel:
        return StudentModel(name, summary_names=["clip", "dino"], num_registers=2, img_size=args.size)

    def module(first: str, rest: list[str]) -> DistillModule:
        specs = [StudentSpec(f"s{i}", student(name)) for i, name in enumerate(rest, 1)]
        m = DistillModule(student(first), teachers, adaptor_hidden_dim=args.adaptor_hidden, students=specs)
        m.log = lambda *a, **k: None  # outside a Trainer
        return m.train()

    def step(m: DistillModule, opt: torch.optim.Optimizer) -> None:
        loss = m.teacher_losses(images, "train")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def optimizer(m: DistillModule) -> torch.optim.Optimizer:
        return torch.optim.AdamW(trainable(m), lr=1e-4)

    together = module(args.students[0], args.students[1:])
    singles = [module(name, []) for name in args.students]
    together_opt, single_opts = optimizer(together), [optimizer(m) for m in singles]
    log(f"{len(args.students)} students {args.students} @{args.size}, teachers CLIP {args.clip} + {args.dino} "
        f"@{args.teacher_size}, batch {len(images)}, fp32; {args.reps} reps (+1 warm-up), interleaved:")
    steps = {"one_teacher_pass": lambda: step(together, together_opt),
             "separate_runs": lambda: [step(m, o) for m, o in zip(singles, single_opts)]}
    times = time_interleaved(steps, args.reps)
    medians = summarize(times, len(images))
    log("")
    ratio_line(f"{len(args.students)} students in one run / {len(args.students)} runs", "one_teacher_pass",
               "separate_runs", medians, times, "goal <= 0.5")


def trainable(module: DistillModule) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def make_steps(module: DistillModule, teachers: list[Teacher], images: torch.Tensor, bf16_student: bool,
               compile_teachers: bool) -> dict[str, Callable[[], None]]:
    student, heads = module.student, module.student.heads
    backbone = partial(student, adaptors=[])  # tokens only: the hand-written steps run the heads themselves

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.AdamW(trainable(module), lr=1e-4)

    def finish(loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def head_losses(out, name: str, summary, dense) -> torch.Tensor:
        pred_summary, pred_dense = heads[name](out.summary.get(name), out.dense)
        pred_dense = losses.resize_to_grid(pred_dense, dense.shape[-2:])
        loss = losses.dense_cosine_smooth_l1(pred_dense, dense)
        if summary is not None:
            loss = loss + losses.summary_cosine(pred_summary, summary)
        return loss

    naive_opt = optimizer()

    def naive() -> None:
        out = backbone(images)
        loss = images.new_zeros(())
        for teacher in teachers:
            with torch.no_grad():
                target = teacher.encoder(images)
            loss = loss + head_losses(out, teacher.name, target.summary, target.dense)
        finish(loss, naive_opt)

    def online_step(opt: torch.optim.Optimizer, teacher_precision: str, bf16: bool) -> None:
        for teacher in teachers:
            teacher.precision = teacher_precision
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = module.teacher_losses(images, "train")
        finish(loss, opt)

    held = [(t.name, t.targets(images)) for t in teachers]  # the cached path: targets already in memory
    cached_opt, student_opt = optimizer(), optimizer()

    def cached() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_student):
            out = backbone(images)
            loss = sum(head_losses(out, name, t.summary, t.dense) for name, t in held)
        finish(loss, cached_opt)

    def student_only() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_student):
            out = backbone(images)
            loss = out.dense.float().square().mean() + sum(s.float().square().mean() for s in out.summary.values())
        finish(loss, student_opt)

    steps = {
        "naive": naive,
        "online_fp32": partial(online_step, optimizer(), "fp32", False),
        "online": partial(online_step, optimizer(), "auto", bf16_student),
        "student_only": student_only,
        "cached": cached,
    }
    if not bf16_student:  # show what bf16 would have cost where auto chose fp32
        steps["online_bf16"] = partial(online_step, optimizer(), "bf16", True)
    if compile_teachers:
        for teacher in teachers:
            teacher.encoder.encode = torch.compile(teacher.encoder.encode)
        steps["online_compiled"] = partial(online_step, optimizer(), "auto", bf16_student)
    return steps


def time_interleaved(steps: dict[str, Callable[[], None]], reps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(reps + 1):  # rep 0 is warm-up (oneDNN kernel choice, allocator), not recorded
        line = []
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            if rep:
                times[name].append(elapsed)
            line.append(f"{name} {elapsed:.2f}s")
        log(f"  rep {rep}/{reps}{' (warm-up)' if rep == 0 else ''}: " + ", ".join(line))
    return times


def summarize(times: dict[str, list[float]], batch: int) -> dict[str, float]:
    log(f"\n{'step':<16}{'median s':>10}{'min':>8}{'max':>8}{'ms/image':>10}")
    medians = {}
    for name, values in times.items():
        med = statistics.median(values)
        medians[name] = med
        log(f"{name:<16}{med:>10.3f}{min(values):>8.3f}{max(values):>8.3f}{1000 * med / batch:>10.1f}")
    return medians


def ratio_line(label: str, num: str, den: str, medians: dict[str, float], times: dict[str, list[float]], goal: str) -> None:
    pairs = [a / b for a, b in zip(times[num], times[den])]  # per interleaved rep
    log(f"{label:<44}{medians[num] / medians[den]:>7.3f}  (per-rep range {min(pairs):.2f}-{max(pairs):.2f}; {goal})")


def flops_table(module: DistillModule, teachers: list[Teacher], student_size: int, teacher_size: int) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    log("\nGFLOPs per image (2 x MACs; exact = math attention, no fused MHA fast path):")
    log(f"{'model':<10}{'px':>5}{'exact':>10}{'plain counter':>15}{'exact/plain':>13}")
    models = [("student", lambda x: module.student(x, adaptors=[]), student_size)] + [(t.name, t.encoder, teacher_size) for t in teachers]
    for name, fn, size in models:
        image = torch.rand(1, 3, size, size)
        exact, _ = count_flops(_Wrap(fn), image)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            fn(image)
        plain = counter.get_total_flops()
        log(f"{name:<10}{size:>5}{exact / 1e9:>10.2f}{plain / 1e9:>15.2f}{exact / plain:>13.2f}")


class _Wrap(torch.nn.Module):
    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def sam_batch_growth(size: int, depth: int, reps: int) -> None:
    """Per-image time of a SAM ViT-B-width image encoder at batch 1 vs 4: whole batch vs chunks of 1."""
    from functools import partial as p

    from segment_anything.modeling import ImageEncoderViT

    globals_ = tuple(i for i in range(depth) if i % 2 == 1)
    encoder = ImageEncoderViT(img_size=size, patch_size=16, embed_dim=768, depth=depth, num_heads=12, mlp_ratio=4,
                              norm_layer=p(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=14,
                              global_attn_indexes=globals_, out_chans=256, qkv_bias=True).eval()
    log(f"\nSAM image encoder (ViT-B width, {depth} blocks, global attention at {globals_}, {size} px, random init), "
        f"ms per image, median of {reps}:")
    one, four = torch.rand(1, 3, size, size), torch.rand(4, 3, size, size)
    runs = {
        "batch 1": lambda: encoder(one),
        "batch 4 whole": lambda: encoder(four),
        "batch 4 chunked (1)": lambda: torch.cat([encoder(x) for x in four.split(1)]),
    }
    per_image = {"batch 1": 1, "batch 4 whole": 4, "batch 4 chunked (1)": 4}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        runs["batch 1"]()  # warm-up
        for _ in range(reps):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) / per_image[name])
    base = statistics.median(times["batch 1"])
    for name, values in times.items():
        med = statistics.median(values)
        log(f"  {name:<22}{1000 * med:>9.1f} ms/image  ({med / base:.2f}x batch 1; range {1000 * min(values):.0f}-"
            f"{1000 * max(values):.0f})")


def cache_images(count: int, size: int) -> torch.Tensor:
    """`count` held-out toy-world images at `size` px in [0, 1]: structured pictures (objects on a noisy
    background), not noise, so the teachers' features have a spectrum to compress."""
    world = ToyWorld(seed=HELDOUT_SEED, image_size=size)
    return torch.stack([torch.from_numpy(np.array(world[i].image)).permute(2, 0, 1) for i in range(count)]).float() / 255


def cache_section(count: int, teachers: list[Teacher], size: int) -> None:
    """The teacher-feature cache's bytes per image vs Theia's bf16 layout and its held-out reconstruction cosine
    (distill.cache.measure: codecs fitted on half of `count` images, measured on the other half)."""
    if count < 2:
        log("\nteacher-feature cache: skipped (--cache-images < 2)")
        return
    log(f"\nteacher-feature cache ({count} toy images at {size} px; PCA fitted on half, cosines on the other half; "
        "goal: bytes <= 0.2 x Theia, cosine >= 0.99):")
    log(format_report(measure_cache(teachers, cache_images(count, size))))


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 reps: < 2 minutes on a 2-core CPU")
    parser.add_argument("--student", default="vit_small_patch16_224")
    parser.add_argument("--clip", default="ViT-B-16", help="open_clip architecture (random init)")
    parser.add_argument("--dino", default="vit_small_patch14_dinov2", help="timm architecture (random init)")
    parser.add_argument("--size", type=int, default=None, help="student resolution (default 224, --quick 96)")
    parser.add_argument("--teacher-size", type=int, default=None, help="teacher resolution (default 224, --quick 112)")
    parser.add_argument("--batch", type=int, default=None, help="default 4, --quick 1")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per step (default 5, --quick 2)")
    parser.add_argument("--adaptor-hidden", type=int, default=1024)
    parser.add_argument("--sam-size", type=int, default=None, help="SAM encoder px (default 1024, --quick 256; 0 skips)")
    parser.add_argument("--sam-depth", type=int, default=None, help="SAM encoder blocks (default 2: one windowed, one global)")
    parser.add_argument("--compile", action="store_true", help="also time the online step with torch.compile'd teachers")
    parser.add_argument("--students", nargs="+", default=None, metavar="TIMM_NAME",
                        help="time these students trained from one teacher pass vs one run each (only this section)")
    parser.add_argument("--cache-images", type=int, default=None,
                        help="images for the teacher-cache bytes/cosine report (default 32, --quick 8; 0 skips)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"size": 96 if quick else 224, "teacher_size": 112 if quick else 224, "batch": 1 if quick else 4,
                "reps": 2 if quick else 5, "sam_size": 256 if quick else 1024, "sam_depth": 2,
                "cache_images": 8 if quick else 32}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    start = time.perf_counter()
    name, flags = cpu_info()
    log(f"CPU: {name}; threads {torch.get_num_threads()}; torch {torch.__version__}")
    log(f"CPU flags: {' '.join(f for f in INTERESTING_FLAGS if f in flags) or '(none of ' + ','.join(INTERESTING_FLAGS) + ')'}"
        f"; bf16 units: {'yes' if any(f in flags for f in BF16_CPU_FLAGS) else 'no'}")
    if args.students:
        torch.manual_seed(0)
        multi_student_section(args, torch.rand(args.batch, 3, args.size, args.size))
        log(f"\nbench took {time.perf_counter() - start:.0f} s")
        return
    choice = choose_precision("cpu")  # logs its one-line reason
    torch.manual_seed(0)
    module, teachers = build(args)
    images = torch.rand(args.batch, 3, args.size, args.size)
    steps = make_steps(module, teachers, images, choice.trainer == "bf16-mixed", args.compile)
    log(f"timing {len(steps)} steps interleaved, batch {args.batch}, {args.reps} reps (+1 warm-up):")
    times = time_interleaved(steps, args.reps)
    medians = summarize(times, args.batch)
    log("")
    ratio_line("online / naive fp32 loop", "online", "naive", medians, times, "goal <= 0.67")
    ratio_line(f"online at chosen precision / fp32 ({choice.trainer}, teachers {choice.teacher})", "online",
               "online_fp32", medians, times, "goal <= 1")
    ratio_line("online fp32 / naive fp32 loop", "online_fp32", "naive", medians, times, "inference_mode alone")
    ratio_line("cached / student-only", "cached", "student_only", medians, times, "goal <= 1.15")
    ratio_line("cached / online", "cached", "online", medians, times, "what the cache saves")
    if "online_bf16" in medians:
        ratio_line("online forced bf16 / online fp32 (not chosen)", "online_bf16", "online_fp32", medians, times,
                   "auto chose fp32")
    if "online_compiled" in medians:
        ratio_line("online with compiled teachers / online", "online_compiled", "online", medians, times,
                   "keep torch.compile only if < 1")
    flops_table(module, teachers, args.size, args.teacher_size)
    if args.sam_size:
        sam_batch_growth(args.sam_size, args.sam_depth, 1 if args.quick or args.sam_size >= 1024 else 2)
    cache_section(args.cache_images, teachers, args.size)
    log(f"\nbench took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
