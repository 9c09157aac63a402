"""Answer-quality metrics: VQA accuracy, exact match and ANLS.

Every metric is a function ``(prediction, answers) -> float`` in [0, 1], registered by
name in :data:`METRICS`; :func:`score` looks one up and runs it::

    score("vqa_accuracy", "Two", ["2"] * 3 + ["3"] * 7)   # 0.9: 3 of 10 humans said "2"

- ``vqa_accuracy``: the VQAv2 metric. Answers are the human annotators' answers (votes,
  usually 10). Both sides are normalised with the VQAv2 rules (:func:`normalize_answer`),
  then ``min(#matching humans / 3, 1)`` is averaged over the leave-one-out subsets of the
  answers (10 choose 9 for 10 answers), as the official evaluation script does.
- ``exact_match``: 1.0 when the normalised prediction equals any normalised answer
  (answers are alternatives, e.g. ``("grey", "gray")``).
- ``anls``: DocVQA's average normalised Levenshtein similarity for one question:
  ``max over answers of 1 - NL`` where ``NL = edit distance / longer length``, on
  lower-cased, whitespace-collapsed strings; a result below ``1 - 0.5`` counts as 0.

Deviations from the official VQAv2 script (``vqaEval.py``), all deliberate:

- It normalises only when the human answers disagree (``len(set(answers)) > 1``); we always
  normalise both sides, as lmms-eval does, so ``"Red."`` against ten ``"red"`` scores 1.
- With a single answer its leave-one-out rule always gives 0; we score one answer by
  normalised exact match.
- Its period rule is a mistyped look-behind (``(?!<=\\d)``) applied at most 32 times (the
  ``re.UNICODE`` flag lands in the ``count`` argument). Its effective rule is "drop every
  period not followed by a digit"; we apply that rule to every period.
- Contraction-table entries that can never match after lower-casing (``"Im"``, ``"Ive"``,
  ``"Id've"``) and the one written backwards (``"somebody'd" -> "somebodyd"``) are left out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

from ..errors import ConfigError, UnknownNameError, did_you_mean

__all__ = [
    "METRICS",
    "Metric",
    "anls",
    "exact_match",
    "levenshtein",
    "normalize_answer",
    "register_metric",
    "score",
    "score_all",
    "vqa_accuracy",
]

Metric = Callable[[str, Sequence[str]], float]

# ---------------------------------------------------------------- VQAv2 normalisation
# The published VQAv2 answer-processing rules, written out as data.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions written without their apostrophe, mapped to the spelled form.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip


def _strip_punctuation(text: str) -> str:
    # A mark touching a space (or any "digit,digit" in the text) is deleted; otherwise it
    # separates words ("yes/no" -> "yes no"). Each mark is judged on the original text.
    keeps_numbers = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        touches_space = (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if touches_space or keeps_numbers else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _normalise_words(text: str) -> str:
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """An answer normalised with the VQAv2 rules.

    Newlines/tabs become spaces; punctuation is removed or turned into a space; periods not
    followed by a digit are dropped; text is lower-cased; number words ``none``/``zero`` to
    ``ten`` become digits; articles ``a``/``an``/``the`` are dropped; apostrophe-less
    contractions are spelled out (``isnt`` -> ``isn't``).

    >>> normalize_answer("A dog.")
    'dog'
    >>> normalize_answer("Two")
    '2'
    """
    if not isinstance(text, str):
        raise ConfigError(f"answers and predictions must be str, got {type(text).__name__}: {text!r}")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _normalise_words(_strip_punctuation(text))


# ---------------------------------------------------------------- metrics
def _check_answers(answers: Sequence[str], metric: str) -> tuple[str, ...]:
    if isinstance(answers, str):
        answers = (answers,)
    answers = tuple(answers)
    if not answers:
        raise ConfigError(f"{metric} needs at least one reference answer, got none")
    for answer in answers:
        if not isinstance(answer, str):
            raise ConfigError(f"{metric}: reference answers must be str, got {type(answer).__name__}: {answer!r}")
    return answers


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against the human answers.

    For each answer i, ``min(#other answers equal to the prediction / 3, 1)``; the mean over
    i. With ten answers of which k match: k >= 4 gives 1, k = 3 gives 0.9 (the seven
    subsets that keep all three matches score 1, the three that drop one score 2/3), k = 2
    gives 0.6, k = 1 gives 0.3. A single answer is scored by normalised exact match.
    """
    answers = _check_answers(answers, "vqa_accuracy")
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(answer) == predicted for answer in answers]
    if len(matches) == 1:
        return float(matches[0])
    total = sum(matches)
    # Leaving answer i out leaves total - matches[i] matching humans.
    return sum(min((total - m) / 3.0, 1.0) for m in matches) / len(matches)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the VQAv2-normalised prediction equals any normalised answer, else 0.0."""
    answers = _check_answers(answers, "exact_match")
    predicted = normalize_answer(prediction)
    return float(any(normalize_answer(answer) == predicted for answer in answers))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _anls_text(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """DocVQA's ANLS for one question: ``max(1 - NL)`` over answers, 0 below ``1 - threshold``.

    ``NL = levenshtein(a, p) / max(len(a), len(p))`` on lower-cased strings with runs of
    whitespace collapsed (two empty strings: NL = 0). As in the official implementation a
    similarity of exactly ``1 - threshold`` is kept.
    """
    answers = _check_answers(answers, "anls")
    if not isinstance(prediction, str):
        raise ConfigError(f"anls: the prediction must be str, got {type(prediction).__name__}")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"anls threshold must be in [0, 1], got {threshold!r}")
    predicted = _anls_text(prediction)
    best = 0.0
    for answer in answers:
        reference = _anls_text(answer)
        longest = max(len(reference), len(predicted))
        distance = 0.0 if longest == 0 else levenshtein(reference, predicted) / longest
        best = max(best, 1.0 - distance)
    return best if best >= 1.0 - threshold else 0.0


# ---------------------------------------------------------------- registry
_METRICS: dict[str, Metric] = {"vqa_accuracy": vqa_accuracy, "exact_match": exact_match, "anls": anls}
METRICS: Mapping[str, Metric] = MappingProxyType(_METRICS)
"""Read-only view: metric name -> ``f(prediction, answers) -> float``."""


def register_metric(name: str, function: Metric) -> Metric:
    """Add a metric under ``name`` (snake_case, not taken yet); returns ``function``."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ConfigError(f"metric name must be snake_case ([a-z][a-z0-9_]*), got {name!r}")
    if name in _METRICS:
        raise ConfigError(f"metric {name!r} is already registered ({_METRICS[name].__module__})")
    if not callable(function):
        raise ConfigError(f"metric {name!r} must be callable (prediction, answers) -> float")
    _METRICS[name] = function
    return function


def _lookup(metric: str) -> Metric:
    try:
        return _METRICS[metric]
    except (KeyError, TypeError):
        hint = did_you_mean(metric, _METRICS)
        raise UnknownNameError(f"no metric named {metric!r}.{hint} Available: {', '.join(sorted(_METRICS))}.") from None


def score(metric: str, prediction: str, answers: Sequence[str]) -> float:
    """Score one prediction with the metric registered as ``metric``."""
    return float(_lookup(metric)(prediction, answers))


def score_all(metrics: Sequence[str], prediction: str, answers: Sequence[str]) -> dict[str, float]:
    """``{metric: score}`` for several metrics (unknown names fail before any scoring)."""
    functions = {name: _lookup(name) for name in metrics}
    return {name: float(function(prediction, answers)) for name, function in functions.items()}
