"""Answer metrics: VQAv2 normalisation and accuracy, exact match, ANLS, the registry."""

from __future__ import annotations

import pytest

from tokenprune import ConfigError, UnknownNameError
from tokenprune.experiments import (
    METRICS,
    anls,
    exact_match,
    normalize_answer,
    register_metric,
    score,
    score_all,
    vqa_accuracy,
)
from tokenprune.experiments.metrics import levenshtein


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),
        ("a dog.", "dog"),
        ("isnt", "isn't"),
        ("The Cat", "cat"),
        ("An apple", "apple"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only none/zero..ten are mapped
        ("yes/no", "yes no"),  # a mark not touching a space separates words
        ("yes / no", "yes no"),  # a mark touching a space is deleted (the spaces stay, split() collapses them)
        ("1,000", "1000"),  # "digit,digit" anywhere: every mark is deleted
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("end.", "end"),
        ("  Red!\n", "red"),
        ("dont", "don't"),
        ("whats up", "what's up"),
        ("it's", "it's"),  # apostrophes are not punctuation
        ("time: 10", "time: 10"),  # colons are not in the list either
        ("Im", "im"),  # the official table's capitalised keys never match after lower-casing
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_normalize_answer_rejects_non_strings() -> None:
    with pytest.raises(ConfigError, match="must be str"):
        normalize_answer(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("matching", "expected"),
    [
        # Ten answers, k equal to the prediction. Leaving out answer i leaves k - 1 matches
        # when i matched, else k; each subset scores min(matches / 3, 1).
        (0, 0.0),
        (1, 0.3),  # (1 * 0 + 9 * 1/3) / 10 = 3/10
        (2, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10
        (3, 0.9),  # (3 * 2/3 + 7 * 1) / 10 = (2 + 7) / 10
        (4, 1.0),  # (4 * 1 + 6 * 1) / 10
        (10, 1.0),
    ],
)
def test_vqa_accuracy_ten_answers(matching: int, expected: float) -> None:
    answers = ["2"] * matching + ["3"] * (10 - matching)
    assert vqa_accuracy("Two", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides() -> None:
    # "A dog." and "dog" are the same answer; 3 of 10 humans said it -> 0.9.
    assert vqa_accuracy("A dog.", ["dog"] * 2 + ["the dog"] + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("Red.", ["red"] * 10) == 1.0  # normalised even when all humans agree


def test_vqa_accuracy_small_answer_sets() -> None:
    assert vqa_accuracy("yes", ["Yes"]) == 1.0  # one answer: exact match
    assert vqa_accuracy("no", ["Yes"]) == 0.0
    # Three answers, two match: leave a match out -> 1 match -> 1/3 (twice); leave the
    # other out -> 2 matches -> 2/3. Mean (1/3 + 1/3 + 2/3) / 3 = 4/9.
    assert vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(4 / 9)


def test_exact_match() -> None:
    assert exact_match("The circle", ["circle", "green circle"]) == 1.0
    assert exact_match("Five", ["5"]) == 1.0
    assert exact_match("grey", ["gray"]) == 0.0
    assert exact_match("  GREEN circle.", ["green circle"]) == 1.0


def test_levenshtein() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("same", "same") == 0


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("hello", ["hello"], 1.0),
        ("Hello  World", ["hello world"], 1.0),  # case and whitespace runs do not count
        ("hallo", ["hello"], 0.8),  # 1 edit / 5 chars
        ("abcd", ["abxy"], 0.5),  # NL exactly 0.5 is kept, as in the official code
        ("abcde", ["axyze"], 0.0),  # NL 3/5 = 0.6 > 0.5 -> 0
        ("kitten", ["sitting", "kitchen"], 5 / 7),  # max over answers: kitchen is 2 edits / 7
        ("", [""], 1.0),
        ("", ["abc"], 0.0),
    ],
)
def test_anls(prediction: str, answers: list[str], expected: float) -> None:
    assert anls(prediction, answers) == pytest.approx(expected)


def test_registry_and_score() -> None:
    assert set(METRICS) >= {"vqa_accuracy", "exact_match", "anls"}
    assert score("exact_match", "two", ["2"]) == 1.0
    assert score_all(["exact_match", "anls"], "hallo", ["hello"]) == {"exact_match": 0.0, "anls": pytest.approx(0.8)}
    with pytest.raises(UnknownNameError, match="vqa_accuracy"):
        score("vqa_acuracy", "x", ["x"])
    with pytest.raises(UnknownNameError):
        score_all(["exact_match", "nope"], "x", ["x"])


def test_empty_answers_are_an_error() -> None:
    for metric in ("vqa_accuracy", "exact_match", "anls"):
        with pytest.raises(ConfigError, match="at least one"):
            score(metric, "x", [])


def test_register_metric() -> None:
    name = "test_only_length_match"
    try:
        register_metric(name, lambda prediction, answers: float(any(len(prediction) == len(a) for a in answers)))
        assert score(name, "abc", ["xyz"]) == 1.0
        with pytest.raises(ConfigError, match="already registered"):
            register_metric(name, exact_match)
        with pytest.raises(ConfigError, match="snake_case"):
            register_metric("Bad Name", exact_match)
    finally:
        from tokenprune.experiments import metrics

        metrics._METRICS.pop(name, None)
