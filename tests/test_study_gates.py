"""The learned-skill and reader gates and the claims' weak links, on hand-made probe and accuracy tables."""

import numpy as np
import pytest

from mllm.study.claims import build_claims, weak_links
from mllm.study.config import Gates
from mllm.study.gates import mean_probes, reader_gate, skill_gate

OWNERS = {"color": "clip", "texture": "dino", "size": "sam"}
SINGLES = ["clip", "dino", "sam"]


def probes(**changes):
    """Probe accuracies where every owner clears every margin (0.9 vs 0.6 untrained, 0.5 pixels, 0.7 others);
    `changes` = {"variant__kind": value} overrides."""
    table = {}
    for name in SINGLES:
        table[name] = {k: (0.9 if OWNERS[k] == name else 0.7) for k in OWNERS}
        table[f"untrained_{name}"] = {k: 0.6 for k in OWNERS}
    table["pixels"] = {k: 0.5 for k in OWNERS}
    for key, value in changes.items():
        name, kind = key.split("__")
        table[name][kind] = value
    return table


def test_skill_gate_passes_when_every_margin_holds():
    gate = skill_gate(probes(), OWNERS, SINGLES, Gates())
    assert gate.status == "valid" and not gate.failures and not gate.missing
    assert gate.passed == 3 * 4  # per owned kind: untrained, pixels, two other singles
    assert "Learned-skill gate: valid" in gate.markdown()


@pytest.mark.parametrize("change, against, short", [
    ({"untrained_dino__texture": 0.8}, "untrained_dino", 0.10),   # 0.9 - 0.8 = 0.10 < 0.20
    ({"pixels__texture": 0.75}, "pixels", 0.05),                  # 0.15 < 0.20
    ({"clip__texture": 0.8}, "clip", 0.05),                       # 0.10 < 0.15
])
def test_skill_gate_names_the_failing_margin(change, against, short):
    gate = skill_gate(probes(**change), OWNERS, SINGLES, Gates())
    assert gate.status == "NOT valid"
    (failure,) = gate.failures
    assert (failure["kind"], failure["owner"], failure["against"]) == ("texture", "dino", against)
    assert failure["short"] == pytest.approx(short)
    assert f"short by {short:.3f}" in gate.markdown() and "NOT valid" in gate.markdown()


def test_skill_gate_margins_come_from_the_config_and_kinds_from_owners():
    # a kind the world may add later (shape), owned by clip: nothing in the gate lists kinds
    table = {"clip": {"shape": 0.8}, "dino": {"shape": 0.7}, "untrained_clip": {"shape": 0.7}, "pixels": {"shape": 0.7}}
    loose = Gates(skill_over_untrained=0.05, skill_over_pixels=0.05, skill_over_others=0.05)
    assert skill_gate(table, {"shape": "clip"}, ["clip", "dino"], loose).status == "valid"
    assert skill_gate(table, {"shape": "clip"}, ["clip", "dino"], Gates()).status == "NOT valid"


def test_skill_gate_without_controls_or_probes_is_not_measured():
    table = probes()
    del table["pixels"]
    gate = skill_gate(table, OWNERS, SINGLES, Gates())
    assert gate.status == "not measured" and any("pixels was not probed" in m for m in gate.missing)
    assert skill_gate({}, OWNERS, SINGLES, Gates()).status == "not measured"  # real-scale: no probes
    assert skill_gate(probes(), {}, SINGLES, Gates()).status == "not measured"  # no owners named


def test_reader_gate_lists_each_failing_variant_and_kind():
    kinds_of = {"clip": "single", "ensemble_all": "ensemble", "student": "student", "blind": "control"}
    probe = {"clip": {"color": 0.9, "texture": 0.9}, "ensemble_all": {"color": 1.0, "texture": 1.0},
             "student": {"color": 0.8, "texture": 0.5}, "blind": {"color": 0.2, "texture": 0.3}}
    llava = {"clip": {"color": 0.9, "texture": 0.45}, "ensemble_all": {"color": 0.95, "texture": 0.95},
             "student": {"color": 0.8, "texture": 0.5}, "blind": {"color": 0.01, "texture": 0.01}}
    gate = reader_gate(probe, llava, ["color", "texture"], kinds_of, Gates())
    assert gate.status == "NOT valid" and gate.passed == 5  # controls are not read
    (failure,) = gate.failures
    assert (failure["variant"], failure["kind"]) == ("clip", "texture") and failure["ratio"] == pytest.approx(0.5)
    assert "(clip, texture)" in gate.markdown() and "0.50 < 0.90" in gate.markdown()
    assert reader_gate(probe, llava, ["color", "texture"], kinds_of, Gates(reader_min_ratio=0.4)).status == "valid"
    assert reader_gate({}, llava, ["color"], kinds_of, Gates()).status == "not measured"


def test_mean_probes_averages_the_seeds():
    assert mean_probes({"student": [{"color": 0.8}, {"color": 0.6}]}) == {"student": {"color": pytest.approx(0.7)}}


def questions(kinds, num_images=200):
    return [{"question": k, "answer": "a", "kind": k, "image": i} for i in range(num_images) for k in kinds]


def test_claims_follow_owners_ensembles_and_fusion_kinds():
    kinds = ["color", "texture", "size", "fusion", "shape"]
    items = questions(kinds)
    rng = np.random.default_rng(0)
    kinds_of = {"clip": "single", "dino": "single", "sam": "single", "ens_a": "ensemble", "ens_b": "ensemble",
                "student": "student"}
    correct = {name: (rng.random((3, len(items))) < 0.5 + 0.05 * i).astype(float) for i, name in enumerate(kinds_of)}
    claims = build_claims(correct, items, kinds_of, owners={"texture": "dino", "shape": "sam"}, fusion_kinds=["fusion"])
    groups = [(c["group"][:3], c["a"], c["b"], c["kind"]) for c in claims]
    assert groups[:4] == [("(b)", "dino", "clip", "texture"), ("(b)", "dino", "sam", "texture"),
                          ("(b)", "sam", "clip", "shape"), ("(b)", "sam", "dino", "shape")]
    assert sum(g[0] == "(c)" for g in groups) == 2 * 3 * 2  # two ensembles x three singles x (overall, fusion)
    best = max(("clip", "dino", "sam"), key=lambda v: correct[v].mean())
    assert [g for g in groups if g[0] == "(d)"] == [("(d)", "student", best, "overall"),
                                                    ("(d)", "student", "ens_a", "overall"),
                                                    ("(d)", "student", "ens_b", "overall")]
    best_ensemble = max(("ens_a", "ens_b"), key=lambda v: correct[v].mean())
    assert [(c["b"], c["expect"]) for c in claims if c["group"] == "(d) student vs best ensemble"] == [
        (best_ensemble, "equivalent")]
    assert all(c["p_holm"] >= c["p"] and isinstance(c["holds"], bool) for c in claims)


def test_failing_claims_name_their_weak_link():
    gates, kinds_of = Gates(), {"clip": "single", "dino": "single", "student": "student"}
    owners = {"color": "clip", "texture": "dino"}
    probe = {"clip": {"color": 0.95, "texture": 0.6}, "dino": {"color": 0.7, "texture": 0.7},
             "untrained_dino": {"color": 0.6, "texture": 0.65}, "untrained_clip": {"color": 0.3, "texture": 0.5},
             "student": {"color": 0.95, "texture": 0.6}}
    llava = {"clip": {"color": 0.95, "texture": 0.6}, "dino": {"color": 0.7, "texture": 0.35},
             "student": {"color": 0.95, "texture": 0.6}}
    skill = weak_links({"a": "dino", "b": "clip", "kind": "texture"}, probe, llava, owners, kinds_of, ["color", "texture"],
                       gates)
    assert any(s.startswith("teacher skill: dino probe 0.700 vs untrained_dino 0.650 on texture") for s in skill)
    assert any(s.startswith("reader: dino LLaVA / probe 0.50 on texture") for s in skill)
    fidelity = weak_links({"a": "student", "b": "dino", "kind": "overall"}, probe, llava, owners, kinds_of,
                          ["color", "texture"], gates)
    assert any(s.startswith("student fidelity: student probe 0.600 vs dino 0.700 on texture") for s in fidelity)
    fine = dict(probe, untrained_dino={"color": 0.1, "texture": 0.1})
    none = weak_links({"a": "clip", "b": "student", "kind": "color"}, fine, llava, owners, kinds_of, ["color"], gates)
    assert none[0].startswith("no weak link measured")
    assert weak_links({"a": "clip", "b": "dino", "kind": "color"}, {}, llava, owners, kinds_of, ["color"],
                      gates)[0].startswith("not measured")
