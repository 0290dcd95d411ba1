"""VQA metrics: VQAv2 accuracy as the official evaluation computes it, OK-VQA (lemmatised), GQA.

The official VQAv2 evaluation (``vqaEval.py``, copied into LAVIS as ``vqa_tools/vqa_eval.py``):

- the prediction is always normalised: newlines/tabs to spaces, stripped, punctuation handled
  (below), lower-cased, number words to digits, articles dropped, contractions restored;
- the ten human answers are punctuation-handled only, and only when they are not all identical
  (so ten identical answers are compared as written);
- each of the ten leave-one-out subsets of nine answers scores min(1, matches / 3), and the
  question's accuracy is their mean;
- dataset scores are means over questions, in percent, rounded to 2 decimals with ``round``.

Pure Python: no torch, no model code.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from blip2kit.core.evaluation.predictions import check_prediction_ids

# Bare spellings (as annotators typed them) -> the apostrophised form the answers use. The
# capitalised keys can never match (words are lower-cased first) and "somebody'd" maps to
# "somebodyd"; both are kept because the official table has them.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip

# Whole words only: "none" counts as zero; numbers above ten stay as written.
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

ARTICLES = frozenset({"a", "an", "the"})

# Removed or turned into a space; "." (see below), "'" and ":" are not in the list.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")  # fmt: skip

_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# A period not followed by a digit ("3.5" keeps its point). The official pattern starts with a
# look-ahead that can never fail, so it is this one.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official code passes re.UNICODE (= 32) where re.sub takes ``count``: at most 32 periods
# are removed from one answer. Kept, so long answers score as they do there.
_PERIOD_REMOVAL_LIMIT = 32


def process_punctuation(text: str) -> str:
    """The official punctuation step.

    Each mark is deleted if it touches a space anywhere in the text (``"a, b"`` -> ``"a b"``) or
    if the text has a comma between two digits (``"1,000"`` -> ``"1000"``, and then every other
    mark is deleted too); otherwise it becomes a space (``"hot-dog"`` -> ``"hot dog"``). Then
    periods not followed by a digit are deleted (``"dog."`` -> ``"dog"``, ``"3.5"`` stays).
    """
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    processed = text
    for mark in PUNCTUATION:
        # The condition reads the original text, the replacement works on the processed one.
        if f"{mark} " in text or f" {mark}" in text or has_digit_comma:
            processed = processed.replace(mark, "")
        else:
            processed = processed.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", processed, count=_PERIOD_REMOVAL_LIMIT)


def process_digits_and_articles(text: str) -> str:
    """Lower-case, split on whitespace, number words to digits, drop articles, restore contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """A predicted answer as the official VQAv2 evaluation compares it: ``"Two."`` -> ``"2"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digits_and_articles(process_punctuation(text))


def _human_answers_as_compared(answers: Sequence[str]) -> list[str]:
    """The ten answers as the official code compares them: punctuation-processed only if they differ."""
    if len(set(answers)) > 1:
        return [process_punctuation(answer) for answer in answers]
    return list(answers)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy of one predicted answer against the human answers (usually ten), in [0, 1].

    The mean over leave-one-out subsets of min(1, matches / 3): an answer given by one annotator
    of ten scores 0.3, by two 0.6, by three 0.9, by four or more 1.0.
    """
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(
            f"answers must be a non-empty list of the human answers, got {answers!r}"
        )
    predicted = normalize_answer(prediction)
    compared = _human_answers_as_compared(answers)
    matches = sum(answer == predicted for answer in compared)
    # Leaving out answer i removes one match exactly when answer i matches.
    subset_scores = [min(1.0, (matches - (answer == predicted)) / 3) for answer in compared]
    return sum(subset_scores) / len(subset_scores)


def official_round(percent: float) -> float:
    """The official evaluation's rounding of a percentage: Python ``round`` to 2 decimals."""
    return round(percent, 2)


def evaluate_vqa(
    predictions: Mapping[Any, str],
    questions: Sequence[Mapping[str, Any]],
    annotations: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """VQAv2 accuracy of ``predictions`` (question_id -> answer) on the official records.

    :param questions: the ``"questions"`` list of a VQAv2 questions JSON
        (``{"question_id", "image_id", "question"}``).
    :param annotations: the ``"annotations"`` list of a VQAv2 annotations JSON
        (``{"question_id", "question_type", "answer_type", "answers": [{"answer", ...}] * 10}``).
    Every annotated question needs a prediction and every prediction an annotation, as the
    official ``loadRes`` requires. Returns percentages: ``accuracy``, ``per_question_type``,
    ``per_answer_type`` rounded as the official code rounds them, the same unrounded under
    ``raw``, ``count`` (questions scored) and ``per_question`` (question_id -> accuracy in [0, 1]).
    """
    records = _annotation_index(questions, annotations)
    _check_answers(predictions, records)
    per_question: dict[Any, float] = {}
    by_question_type: dict[str, list[float]] = defaultdict(list)
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    for question_id, record in records.items():
        prediction = predictions[question_id]
        accuracy = vqa_accuracy(prediction, record["answers"])
        per_question[question_id] = accuracy
        by_question_type[record["question_type"]].append(accuracy)
        by_answer_type[record["answer_type"]].append(accuracy)
    return _vqa_report(per_question, by_question_type, by_answer_type)


def _vqa_report(
    per_question: Mapping[Any, float],
    by_question_type: Mapping[str, list[float]],
    by_answer_type: Mapping[str, list[float]],
) -> dict[str, Any]:
    def percent(scores: Iterable[float]) -> float:
        scores = list(scores)
        return 100.0 * sum(scores) / len(scores)

    raw = {
        "accuracy": percent(per_question.values()),
        "per_question_type": {kind: percent(s) for kind, s in sorted(by_question_type.items())},
        "per_answer_type": {kind: percent(s) for kind, s in sorted(by_answer_type.items())},
    }
    return {
        "accuracy": official_round(raw["accuracy"]),
        "per_question_type": {k: official_round(v) for k, v in raw["per_question_type"].items()},
        "per_answer_type": {k: official_round(v) for k, v in raw["per_answer_type"].items()},
        "count": len(per_question),
        "raw": raw,
        "per_question": dict(per_question),
    }


def _annotation_index(
    questions: Sequence[Mapping[str, Any]], annotations: Sequence[Mapping[str, Any]]
) -> dict[Any, dict[str, Any]]:
    """question_id -> {"answers": [str], "question_type", "answer_type"}, checking the records."""
    if isinstance(questions, Mapping) or isinstance(annotations, Mapping):
        raise ValueError(
            "questions and annotations must be the lists under the JSON files' \"questions\" "
            "and \"annotations\" keys, not the whole files"
        )
    question_ids = set()
    for position, question in enumerate(questions):
        if "question_id" not in question:
            raise ValueError(f"questions[{position}] has no 'question_id'")
        question_ids.add(question["question_id"])
    index: dict[Any, dict[str, Any]] = {}
    for position, annotation in enumerate(annotations):
        where = f"annotations[{position}]"
        for key in ("question_id", "answers", "question_type", "answer_type"):
            if key not in annotation:
                raise ValueError(f"{where} has no {key!r}; a VQAv2 annotation record needs it")
        answers = annotation["answers"]
        if not isinstance(answers, list) or not answers:
            raise ValueError(f"{where} 'answers' must be a non-empty list of {{'answer': ...}}")
        texts = []
        for answer in answers:
            if not isinstance(answer, Mapping) or not isinstance(answer.get("answer"), str):
                raise ValueError(f"{where} 'answers' holds {answer!r}; each needs an 'answer' string")
            texts.append(answer["answer"])
        question_id = annotation["question_id"]
        if question_ids and question_id not in question_ids:
            raise ValueError(
                f"{where} has question_id {question_id!r}, which is not in the questions file; "
                "are the questions and annotations of the same split?"
            )
        index[question_id] = {
            "answers": texts,
            "question_type": annotation["question_type"],
            "answer_type": annotation["answer_type"],
        }
    if not index:
        raise ValueError("no annotations to evaluate against")
    return index


def _check_answers(predictions: Mapping[Any, Any], records: Mapping[Any, Any]) -> None:
    check_prediction_ids(
        predictions, records, id_name="question_id", what="answer",
        unpredicted="questions have no prediction", unexpected="predictions have no annotation",
        fix="Predict every question of the annotation file",
    )


# -- OK-VQA ---------------------------------------------------------------------------------------

SPACY_MODEL = "en_core_web_sm"
_lemmatizer_cache: dict[str, Any] = {}


def spacy_lemmatizer() -> tuple[Callable[[str], str] | None, str | None]:
    """(lemmatise function, None) where spaCy and en_core_web_sm load; else (None, why not).

    As LAVIS ``_lemmatize``: NOUN and VERB tokens become their lemma, the rest stay as written,
    joined by single spaces. Never downloads the model.
    """
    if "nlp" not in _lemmatizer_cache:
        try:
            import spacy
        except ImportError:
            return None, "spaCy is not installed (pip install spacy, then install en_core_web_sm)"
        try:
            _lemmatizer_cache["nlp"] = spacy.load(SPACY_MODEL)
        except OSError:
            return None, (
                f"spaCy's {SPACY_MODEL} model is not installed "
                f"(python -m spacy download {SPACY_MODEL})"
            )
    nlp = _lemmatizer_cache["nlp"]

    def lemmatize(answer: str) -> str:
        return " ".join(
            token.lemma_ if token.pos_ in ("NOUN", "VERB") else token.text for token in nlp(answer)
        )

    return lemmatize, None


def evaluate_okvqa(
    predictions: Mapping[Any, str],
    questions: Sequence[Mapping[str, Any]],
    annotations: Sequence[Mapping[str, Any]],
    *,
    lemmatizer: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """OK-VQA: the VQAv2 metric on lemmatised predictions, as LAVIS (``apply_lemmatizer: True``).

    With spaCy's en_core_web_sm (or a ``lemmatizer`` given), the report is that of the
    lemmatised predictions with ``"lemmatized": True``. Without it the report is the plain VQAv2
    metric with ``"lemmatized": False`` and ``"unavailable": {"lemmatized": reason}``: the
    lemmatised score is not estimated. ``"unlemmatized_accuracy"`` is always there.
    """
    plain = evaluate_vqa(predictions, questions, annotations)
    reason = None
    if lemmatizer is None:
        lemmatizer, reason = spacy_lemmatizer()
    if lemmatizer is None:
        return {
            **plain,
            "lemmatized": False,
            "unavailable": {"lemmatized": reason},
            "unlemmatized_accuracy": plain["accuracy"],
        }
    lemmatized = {qid: lemmatizer(answer) for qid, answer in predictions.items()}
    report = evaluate_vqa(lemmatized, questions, annotations)
    return {**report, "lemmatized": True, "unlemmatized_accuracy": plain["accuracy"]}


# -- GQA ------------------------------------------------------------------------------------------


def evaluate_gqa(
    predictions: Mapping[Any, str],
    questions: Mapping[Any, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """GQA accuracy: exact match of the normalised prediction with the answer, as LAVIS ``GQATask``.

    LAVIS (``GQATask._report_metrics`` with ``inference_method: generate``) normalises the
    generated answer with the two VQAv2 steps (punctuation, then digits/articles/contractions) and
    compares it with the ground-truth answer as written (GQA answers are already lower-case words
    or short phrases). There is no leave-one-out: one answer, right or wrong.

    :param questions: a GQA balanced questions JSON (question_id -> record with ``"answer"`` and
        optional ``"types"``) or a list of records with ``"question_id"`` and ``"answer"``
        (LAVIS' converted format).
    Returns ``accuracy`` (percent, unrounded, as LAVIS reports it), ``count``, ``per_question``
    (0 or 1) and, where records have GQA ``types``, ``per_structural_type`` / ``per_semantic_type``.
    """
    records = _gqa_index(questions)
    _check_answers(predictions, records)
    per_question: dict[Any, float] = {}
    by_type: dict[str, dict[str, list[float]]] = {"structural": defaultdict(list), "semantic": defaultdict(list)}
    for question_id, record in records.items():
        prediction = predictions[question_id]
        # LAVIS applies the two steps without normalize_answer's newline/strip pass.
        predicted = process_digits_and_articles(process_punctuation(prediction))
        correct = float(predicted == record["answer"])
        per_question[question_id] = correct
        types = record.get("types") or {}
        for family, groups in by_type.items():
            if family in types:
                groups[types[family]].append(correct)
    report: dict[str, Any] = {
        "accuracy": 100.0 * sum(per_question.values()) / len(per_question),
        "count": len(per_question),
        "per_question": per_question,
    }
    for family, groups in by_type.items():
        if groups:
            report[f"per_{family}_type"] = {
                kind: 100.0 * sum(scores) / len(scores) for kind, scores in sorted(groups.items())
            }
    return report


def _gqa_index(
    questions: Mapping[Any, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
) -> dict[Any, Mapping[str, Any]]:
    if isinstance(questions, Mapping):
        items = list(questions.items())
    else:
        items = []
        for position, record in enumerate(questions):
            if "question_id" not in record:
                raise ValueError(f"questions[{position}] has no 'question_id'")
            items.append((record["question_id"], record))
    index = {}
    for question_id, record in items:
        if not isinstance(record.get("answer"), str):
            raise ValueError(
                f"GQA question {question_id!r} has no 'answer' string; evaluate on a split with "
                "answers (testdev/val balanced questions)"
            )
        index[question_id] = record
    if not index:
        raise ValueError("no GQA questions to evaluate against")
    return index


__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "PUNCTUATION",
    "evaluate_gqa",
    "evaluate_okvqa",
    "evaluate_vqa",
    "normalize_answer",
    "official_round",
    "process_digits_and_articles",
    "process_punctuation",
    "spacy_lemmatizer",
    "vqa_accuracy",
]
