"""Answer metrics: VQAv2-style normalized exact match, POPE-style yes/no metrics, multiple-choice accuracy.

    normalize_answer("Two dogs.")                     -> "2 dogs"
    yes_no_metrics(["yes", "no"], ["yes", "yes"])     -> accuracy, precision, recall, f1, yes_ratio
    score(predictions, items)                         -> {"overall": {...}, "by_kind": {kind: {...}}}

Each question is scored by its reference: "yes"/"no" answers as yes/no, questions with options as
multiple choice (the option letter or the option text counts), everything else by exact match.
"""

from __future__ import annotations

import re
from collections import defaultdict

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "wasnt": "wasn't", "werent": "weren't", "im": "i'm", "ive": "i've",
                 "thats": "that's", "whats": "what's", "theres": "there's", "its": "it's"}
_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$|~:]")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")  # a period that is not a decimal point
_COMMA_NUMBER = re.compile(r"(\d),(\d)")


def normalize_answer(text: str) -> str:
    """VQAv2 normalization: lowercase, drop punctuation (not decimal points), number words -> digits,
    drop articles, restore common contractions, collapse spaces."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _COMMA_NUMBER.sub(r"\1\2", text)
    text = _PUNCTUATION.sub(" ", text)
    text = _PERIOD.sub("", text).replace("'", " '").replace(" '", "'")
    words = []
    for word in text.split():
        word = _NUMBERS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalized prediction equals the normalized reference."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def yes_no(text: str) -> str:
    """'yes', 'no' or 'other' from the first word of a normalized answer (POPE reads answers this way)."""
    words = normalize_answer(text).split()
    return words[0] if words and words[0] in ("yes", "no") else "other"


def yes_no_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """POPE metrics with 'yes' as the positive class; a non-yes/no answer counts as a wrong 'no'."""
    pred = [yes_no(p) == "yes" for p in predictions]
    ref = [yes_no(r) == "yes" for r in references]
    tp = sum(p and r for p, r in zip(pred, ref))
    fp = sum(p and not r for p, r in zip(pred, ref))
    fn = sum(r and not p for p, r in zip(pred, ref))
    correct = sum(yes_no(p) == yes_no(r) for p, r in zip(predictions, references))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": correct / len(predictions) if predictions else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(pred) / len(pred) if pred else 0.0,
    }


def choice_correct(prediction: str, reference: str, options: list[str]) -> float:
    """1.0 when the prediction names the reference option by its text or its letter (A, B, ...)."""
    predicted = normalize_answer(prediction)
    if predicted == normalize_answer(reference):
        return 1.0
    letters = {chr(ord("a") + i): option for i, option in enumerate(options)}
    letter = predicted.rstrip(".").split(" ")[0] if predicted else ""
    return float(letter in letters and len(predicted) <= 2
                 and normalize_answer(letters[letter]) == normalize_answer(reference))


def question_type(reference: str, options: list[str] | None) -> str:
    """How a question is scored: 'yes_no', 'choice' or 'exact'."""
    if options:
        return "choice"
    return "yes_no" if yes_no(reference) != "other" and len(normalize_answer(reference).split()) == 1 else "exact"


def correctness(predictions: list[str], references: list[str], options: list[list[str] | None] | None = None) -> list[float]:
    """1.0 / 0.0 per question, each scored by its reference (choice, yes/no or exact match)."""
    options = options or [None] * len(predictions)
    correct: list[float] = []
    for prediction, reference, choices in zip(predictions, references, options):
        scoring = question_type(reference, choices)
        if scoring == "choice":
            correct.append(choice_correct(prediction, reference, choices))
        elif scoring == "yes_no":
            correct.append(float(yes_no(prediction) == yes_no(reference)))
        else:
            correct.append(exact_match(prediction, reference))
    return correct


def score(predictions: list[str], references: list[str], kinds: list[str],
          options: list[list[str] | None] | None = None) -> dict:
    """Accuracy overall and per kind (+ POPE metrics for kinds holding yes/no questions)."""
    if not len(predictions) == len(references) == len(kinds):
        raise ValueError(f"score: {len(predictions)} predictions, {len(references)} references, {len(kinds)} kinds; "
                         "they must have equal lengths.")
    options = options or [None] * len(predictions)
    correct = correctness(predictions, references, options)
    by_kind: dict[str, list[int]] = defaultdict(list)
    for index, kind in enumerate(kinds):
        by_kind[kind].append(index)
    result = {"overall": {"accuracy": sum(correct) / len(correct) if correct else 0.0, "count": len(correct)},
              "by_kind": {}}
    for kind, indices in sorted(by_kind.items()):
        entry = {"accuracy": sum(correct[i] for i in indices) / len(indices), "count": len(indices)}
        yes_no_indices = [i for i in indices if question_type(references[i], options[i]) == "yes_no"]
        if yes_no_indices:
            entry["pope"] = yes_no_metrics([predictions[i] for i in yes_no_indices],
                                           [references[i] for i in yes_no_indices])
        result["by_kind"][kind] = entry
    return result
