"""Answer metrics against hand-computed cases (tests/test_mllm_metrics.py)."""

import pytest

from mllm.metrics import choice_correct, exact_match, normalize_answer, score, yes_no_metrics


def test_vqa_normalization():
    assert normalize_answer("Two dogs.") == "2 dogs"
    assert normalize_answer("  The RED, circle!") == "red circle"
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("dont know") == "don't know"
    assert exact_match("A Circle.", "circle") == 1.0 and exact_match("circles", "circle") == 0.0


def test_yes_no_metrics_hand_computed():
    predictions = ["Yes.", "yes", "no", "no", "maybe", "yes"]
    references = ["yes", "no", "yes", "no", "yes", "yes"]
    # tp = 2 (0, 5), fp = 1 (1), fn = 2 (2, 4), correct = 3 (0, 3, 5)
    m = yes_no_metrics(predictions, references)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m["yes_ratio"] == pytest.approx(3 / 6)


def test_multiple_choice():
    options = ["circle", "square", "star"]
    assert choice_correct("square", "square", options) == 1.0
    assert choice_correct("B", "square", options) == 1.0
    assert choice_correct("A", "square", options) == 0.0
    assert choice_correct("a star", "square", options) == 0.0


def test_score_breaks_down_by_kind():
    result = score(
        predictions=["red", "blue", "yes", "no", "b", "3"],
        references=["red", "green", "yes", "yes", "large", "three"],
        kinds=["color", "color", "existence", "existence", "choice", "count"],
        options=[None, None, None, None, ["small", "large"], None],
    )
    assert result["overall"] == {"accuracy": pytest.approx(4 / 6), "count": 6}
    assert result["by_kind"]["color"]["accuracy"] == 0.5
    assert result["by_kind"]["choice"]["accuracy"] == 1.0 and result["by_kind"]["count"]["accuracy"] == 1.0
    pope = result["by_kind"]["existence"]["pope"]
    assert pope["accuracy"] == 0.5 and pope["precision"] == 1.0 and pope["recall"] == 0.5
    with pytest.raises(ValueError, match="equal lengths"):
        score(["a"], [], ["x"])
