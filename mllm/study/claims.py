"""The study's claims, tested on paired differences and Holm-corrected together, with the weak link named
for each claim that does not hold.

Claims: (b) each owner (study `owners`) ahead of every other single tower on its owned kind; (c) each ensemble
ahead of every single tower, overall and on each of the study's `fusion_kinds`; (d) each student ahead of the
best single tower (highest overall mean) and equivalent to each ensemble (TOST, ±EQUIVALENCE_MARGIN); the row
against the best ensemble (highest overall mean, whatever its fusion) is the group "(d) student vs best ensemble".
A claim that does not hold is explained from measured numbers (`weak_links`): teacher skill (owner probe vs
its untrained tower's), student fidelity (student probe vs the owner teacher's) and reader (LLaVA / probe).

    claims = build_claims(correct, items, kinds_of, owners={"texture": "dino"}, fusion_kinds=["fusion"])
    for claim in claims:
        if not claim["holds"]:
            claim["why"] = "; ".join(weak_links(claim, probes, llava, owners, kinds_of, kinds, gates))
"""

from __future__ import annotations

import numpy as np

from mllm.study.stats import ALPHA, holm, paired_difference, tost

EQUIVALENCE_MARGIN = 0.02


def _select(items: list[dict], kind: str | None) -> np.ndarray:
    return np.array([kind is None or item["kind"] == kind for item in items])


class Claims:
    """Paired comparisons collected for one Holm correction."""

    def __init__(self, correct: dict[str, np.ndarray], items: list[dict]) -> None:
        self.correct, self.items = correct, items
        self.image_ids = np.array([item["image"] for item in items])
        self.rows: list[dict] = []

    def add(self, group: str, a: str, b: str, kind: str | None, expect: str = "ahead") -> None:
        if a not in self.correct or b not in self.correct:
            return
        mask = _select(self.items, kind)
        if not mask.any():  # e.g. no fusion questions in a real-scale benchmark
            return
        diff = paired_difference(self.correct[a][:, mask], self.correct[b][:, mask], self.image_ids[mask])
        row = {"group": group, "a": a, "b": b, "kind": kind or "overall", "delta": diff.delta, "low": diff.low,
               "high": diff.high, "p": diff.p, "expect": expect, "diff": diff}
        if expect == "equivalent":
            row["p_tost"] = tost(diff, EQUIVALENCE_MARGIN)
        self.rows.append(row)

    def finish(self) -> list[dict]:
        adjusted = holm([r["p"] for r in self.rows]) if self.rows else []
        for row, p_holm in zip(self.rows, adjusted):
            row["p_holm"] = p_holm
            significant = p_holm < ALPHA
            if not significant:
                row["verdict"] = "no difference measured"
            else:
                row["verdict"] = f"{row['a']} ahead" if row["delta"] > 0 else f"{row['b']} ahead"
            if row["expect"] == "equivalent":
                row["holds"] = bool(row["p_tost"] < ALPHA)
                row["verdict"] += ("; equivalent within ±%.2f (TOST p=%.3f)" if row["holds"]
                                   else "; equivalence not shown at ±%.2f (TOST p=%.3f)") % (EQUIVALENCE_MARGIN, row["p_tost"])
            else:
                row["holds"] = bool(significant and row["delta"] > 0)
            row.pop("diff")
        return self.rows


def build_claims(correct: dict[str, np.ndarray], items: list[dict], kinds_of: dict[str, str],
                 owners: dict[str, str], fusion_kinds: list[str]) -> list[dict]:
    """The claims (b), (c), (d) of the module docstring on the variants that ran, Holm-corrected together."""
    claims = Claims(correct, items)
    singles = [v for v, k in kinds_of.items() if k == "single"]
    ensembles = [v for v, k in kinds_of.items() if k == "ensemble"]
    for kind, owner in owners.items():
        for other in singles:
            if other != owner:
                claims.add("(b) family skill", owner, other, kind)
    for ensemble in ensembles:
        for single in singles:
            claims.add("(c) ensemble", ensemble, single, None)
            for kind in fusion_kinds:
                claims.add("(c) ensemble", ensemble, single, kind)
    ranked = sorted((v for v in singles if v in correct), key=lambda v: -correct[v].mean())
    best_ensemble = max((v for v in ensembles if v in correct), key=lambda v: correct[v].mean(), default=None)
    for student in (v for v, k in kinds_of.items() if k == "student"):
        if ranked:
            claims.add("(d) student", student, ranked[0], None)
        for ensemble in ensembles:
            group = "(d) student vs best ensemble" if ensemble == best_ensemble else "(d) student"
            claims.add(group, student, ensemble, None, expect="equivalent")
    return claims.finish()


def weak_links(claim: dict, probes: dict[str, dict[str, float]], llava: dict[str, dict[str, float]],
               owners: dict[str, str], kinds_of: dict[str, str], kinds: list[str], gates) -> list[str]:
    """The measured links that fail for `claim` (probes / llava: mean accuracy per variant and kind): teacher
    skill on the owned kinds the claim depends on, student fidelity on them, the LLaVA's reading of a and b."""
    if not probes:
        return ["not measured: no probes (they need the toy world's object labels)"]
    kind = claim["kind"]
    asked = kinds if kind == "overall" else [kind]
    owned = [kind] if kind in owners else list(owners)  # overall and fusion kinds need every owned skill
    links = []
    for k in owned:
        owner, untrained = owners[k], f"untrained_{owners[k]}"
        if k in probes.get(owner, {}) and k in probes.get(untrained, {}):
            gap = probes[owner][k] - probes[untrained][k]
            if gap < gates.skill_over_untrained:
                links.append(f"teacher skill: {owner} probe {probes[owner][k]:.3f} vs {untrained} "
                             f"{probes[untrained][k]:.3f} on {k} ({gap:+.3f} < {gates.skill_over_untrained:.2f})")
    for student in (v for v in (claim["a"], claim["b"]) if kinds_of.get(v) == "student"):
        for k in owned:
            owner = owners[k]
            if k in probes.get(student, {}) and k in probes.get(owner, {}):
                gap = probes[student][k] - probes[owner][k]
                if gap < -gates.fidelity_slack:
                    links.append(f"student fidelity: {student} probe {probes[student][k]:.3f} vs {owner} "
                                 f"{probes[owner][k]:.3f} on {k} ({gap:+.3f})")
    for variant in (claim["a"], claim["b"]):
        for k in asked:
            probe, read = probes.get(variant, {}).get(k), llava.get(variant, {}).get(k)
            if probe and read is not None and read / probe < gates.reader_min_ratio:
                links.append(f"reader: {variant} LLaVA / probe {read / probe:.2f} on {k}")
    return links or ["no weak link measured (teacher skill, student fidelity and reader pass): the difference is "
                     "smaller than these seeds and questions resolve"]
