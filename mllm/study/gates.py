"""The study's gates beyond the instrument gate: can the table be read as a test of *learned* skills, and does
the LLaVA read what the towers know?

- Learned-skill gate: for each owned kind K (study `owners`) with owner O, the probe of O on K beats the probe
  of `untrained_O` by `gates.skill_over_untrained`, the raw-pixel probe by `gates.skill_over_pixels` and every
  other single tower's probe by `gates.skill_over_others`.
- Reader gate: LLaVA accuracy / probe accuracy >= `gates.reader_min_ratio` on every asked kind for every
  single, ensemble and student variant.

Each gate is "valid", "NOT valid" (a check failed: named with by how much) or "not measured" (no probes, no
owners, or a row a check needs was not probed).

    probes = mean_probes(records_probes)             # {variant: {kind: mean accuracy over seeds}}
    skill = skill_gate(probes, study.owners, singles, study.gates)
    reader = reader_gate(probes, llava, kinds, kinds_of, study.gates)   # llava: {variant: {kind: mean}}
    skill.status, skill.failures, skill.markdown()
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

READ_KINDS = ("single", "ensemble", "student")  # the variants whose reading the reader gate checks


@dataclass
class Gate:
    """A gate's verdict: `status` is "valid", "NOT valid" or "not measured"; `failures` name each failing check
    (dicts with a `text`), `missing` each check that could not be made."""

    name: str
    status: str
    failures: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    passed: int = 0

    def markdown(self) -> str:
        lines = [f"**{self.name}: {self.status}**" + (f" ({self.passed} check{'s' if self.passed != 1 else ''} passed)." if self.passed else ".")]
        lines += [f"- fails: {f['text']}" for f in self.failures]
        lines += [f"- not measured: {m}" for m in self.missing]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"status": self.status, "failures": self.failures, "missing": self.missing, "passed": self.passed}


def _verdict(name: str, failures: list[dict], missing: list[str], passed: int) -> Gate:
    status = "NOT valid" if failures else "not measured" if missing or not passed else "valid"
    return Gate(name, status, failures, missing, passed)


def mean_probes(probes: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """{variant: {kind: mean over the variant's probe runs (one per seed for students)}}."""
    return {name: {k: float(np.mean([r[k] for r in runs])) for k in runs[0]} for name, runs in probes.items() if runs}


def skill_gate(probes: dict[str, dict[str, float]], owners: dict[str, str], singles: list[str], gates) -> Gate:
    """The learned-skill gate (see the module docstring) on mean probe accuracies."""
    name = "Learned-skill gate"
    if not probes or not owners:
        why = "no probes (they need the toy world's object labels)" if not probes else "the study names no `owners`"
        return Gate(name, "not measured", missing=[why])
    failures, missing, passed = [], [], 0
    for kind, owner in owners.items():
        if kind not in probes.get(owner, {}):
            missing.append(f"{kind}: owner {owner} was not probed on it")
            continue
        own = probes[owner][kind]
        others = [(f"untrained_{owner}", gates.skill_over_untrained, "probe_controls.untrained"),
                  ("pixels", gates.skill_over_pixels, "probe_controls.pixels")]
        others += [(s, gates.skill_over_others, None) for s in singles if s != owner and s in probes]
        for against, margin, key in others:
            if kind not in probes.get(against, {}):
                missing.append(f"{kind}: {against} was not probed" + (f" (set {key})" if key else ""))
                continue
            gap = own - probes[against][kind]
            if gap >= margin:
                passed += 1
                continue
            failures.append({"kind": kind, "owner": owner, "against": against, "margin": margin, "gap": gap,
                             "short": margin - gap,
                             "text": f"{kind} ({owner}): probe {own:.3f} over {against} {probes[against][kind]:.3f} is "
                                     f"{gap:+.3f} < {margin:.2f} (short by {margin - gap:.3f})"})
    return _verdict(name, failures, missing, passed)


def reader_gate(probes: dict[str, dict[str, float]], llava: dict[str, dict[str, float]], kinds: list[str],
                kinds_of: dict[str, str], gates) -> Gate:
    """The reader gate (see the module docstring): `llava` holds mean LLaVA accuracies per variant and kind."""
    name = "Reader gate"
    if not probes:
        return Gate(name, "not measured", missing=["no probes (they need the toy world's object labels)"])
    failures, missing, passed = [], [], 0
    for variant, kind_of in kinds_of.items():
        if kind_of not in READ_KINDS:
            continue
        if variant not in probes or variant not in llava:
            missing.append(f"{variant}: " + ("no probe" if variant not in probes else "no finished LLaVA run"))
            continue
        for kind in kinds:
            probe, read = probes[variant].get(kind), llava[variant].get(kind)
            if probe is None or read is None or probe <= 0:
                missing.append(f"{variant} on {kind}: no probe or LLaVA accuracy")
                continue
            ratio = read / probe
            if ratio >= gates.reader_min_ratio:
                passed += 1
                continue
            failures.append({"variant": variant, "kind": kind, "ratio": ratio, "llava": read, "probe": probe,
                             "text": f"({variant}, {kind}): LLaVA {read:.3f} / probe {probe:.3f} = {ratio:.2f} "
                                     f"< {gates.reader_min_ratio:.2f}"})
    return _verdict(name, failures, missing, passed)


def skill_table(probes: dict[str, dict[str, float]], owners: dict[str, str], singles: list[str]) -> str:
    """Markdown: per owned kind, each single tower's probe trained / untrained, and the raw-pixel probe."""
    if not probes or not owners:
        return ""

    def cell(name: str, kind: str) -> str:
        value = probes.get(name, {}).get(kind)
        return "–" if value is None else f"{value:.3f}"

    shown = [s for s in singles if s in probes]
    head = ["kind", "owner", *(f"{s} trained / untrained" for s in shown), "pixels"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, owner in owners.items():
        cells = [kind, owner, *(f"{cell(s, kind)} / {cell(f'untrained_{s}', kind)}" for s in shown), cell("pixels", kind)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
