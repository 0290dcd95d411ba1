"""VQAv2 / OK-VQA / GQA metrics on hand-computed cases of the official evaluation's rules."""

from __future__ import annotations

import subprocess
import sys

import pytest

from blip2kit.core.evaluation import (
    evaluate_gqa,
    evaluate_okvqa,
    evaluate_vqa,
    normalize_answer,
    vqa_accuracy,
)
from blip2kit.core.evaluation.vqa import process_punctuation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two.", "2"),  # trailing period dropped, number word to digit
        ("The dog", "dog"),  # articles dropped
        ("an apple a day", "apple day"),
        ("none", "0"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("3.5", "3.5"),  # a period before a digit stays
        ("e.g", "eg"),
        ("1,000", "1000"),  # comma between digits: deleted
        ("hot-dog", "hot dog"),  # a mark touching no space becomes a space
        ("red, white", "red white"),  # a mark touching a space is deleted
        ("1,000 (approx)", "1000 approx"),  # digit comma: every mark deleted, none spaced
        ("dont", "don't"),  # contractions restored
        ("Isnt", "isn't"),
        ("  yes\n", "yes"),
        ("what's up?", "what's up"),  # apostrophes are not punctuation
        ("10:30", "10:30"),  # neither is ':'
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_period_limit_of_the_official_code() -> None:
    # re.UNICODE (32) lands in re.sub's count: only the first 32 periods go.
    assert process_punctuation("." * 40) == "." * 8


def test_number_word_matches_identical_digit_answers() -> None:
    assert vqa_accuracy("two", ["2"] * 10) == 1.0


def test_leave_one_out_fractions() -> None:
    # n annotators agree: leaving one of them out leaves n-1, leaving another out leaves n.
    answers = ["cat"] + ["dog"] * 9
    assert vqa_accuracy("cat", answers) == pytest.approx(9 * (1 / 3) / 10)  # 0.3
    assert vqa_accuracy("cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy("cat", ["cat"] * 4 + ["dog"] * 6) == 1.0
    assert vqa_accuracy("bird", answers) == 0.0


def test_yes_with_period_against_mixed_answers() -> None:
    # "Yes." -> "yes"; 2 of 10 say yes: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert vqa_accuracy("Yes.", ["yes", "yes"] + ["no"] * 8) == pytest.approx(0.6)


def test_human_answers_get_punctuation_only_and_only_when_they_differ() -> None:
    # Differing answers are punctuation-processed but not digit-mapped: "two" stays "two".
    assert vqa_accuracy("two", ["two"] * 8 + ["2"] * 2) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    # Ten identical answers are compared as written, so "hot-dog" can never match them ...
    assert vqa_accuracy("hot-dog", ["hot-dog"] * 10) == 0.0
    # ... while differing answers are processed to "hot dog" and do.
    assert vqa_accuracy("hot-dog", ["hot-dog"] * 9 + ["hotdog"]) == 1.0


def _vqa_records() -> tuple[list[dict], list[dict]]:
    def annotation(qid: int, qtype: str, atype: str, answers: list[str]) -> dict:
        return {
            "question_id": qid,
            "image_id": 100 + qid,
            "question_type": qtype,
            "answer_type": atype,
            "multiple_choice_answer": answers[0],
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)
            ],
        }

    annotations = [
        annotation(1, "how many", "number", ["2"] * 10),
        annotation(2, "is the", "yes/no", ["yes", "yes"] + ["no"] * 8),
        annotation(3, "what color", "other", ["red"] + ["blue"] * 9),
    ]
    questions = [{"question_id": a["question_id"], "image_id": a["image_id"], "question": "?"} for a in annotations]
    return questions, annotations


def test_evaluate_vqa_breakdowns_and_official_rounding() -> None:
    questions, annotations = _vqa_records()
    report = evaluate_vqa({1: "two", 2: "Yes.", 3: "red"}, questions, annotations)
    # per question: 1.0, 0.6, 0.3 -> mean 0.6333...
    assert report["per_question"] == pytest.approx({1: 1.0, 2: 0.6, 3: 0.3})
    assert report["raw"]["accuracy"] == pytest.approx(190 / 3)
    assert report["accuracy"] == 63.33
    assert report["per_answer_type"] == {"number": 100.0, "other": 30.0, "yes/no": 60.0}
    assert report["per_question_type"] == {"how many": 100.0, "is the": 60.0, "what color": 30.0}
    assert report["count"] == 3


def test_evaluate_vqa_refuses_incomplete_predictions() -> None:
    questions, annotations = _vqa_records()
    with pytest.raises(ValueError, match="1 questions have no prediction"):
        evaluate_vqa({1: "2", 2: "yes"}, questions, annotations)
    with pytest.raises(ValueError, match=r"3 questions have no prediction.*3 predictions have no annotation.*"
                       r"question_ids of the same type \(int vs str\)"):
        evaluate_vqa({"1": "2", "2": "yes", "3": "red"}, questions, annotations)
    with pytest.raises(ValueError, match="prediction for question_id 3 is list, not a string answer"):
        evaluate_vqa({1: "2", 2: "yes", 3: ["red"]}, questions, annotations)
    broken = [dict(annotations[0])]
    del broken[0]["answer_type"]
    with pytest.raises(ValueError, match=r"annotations\[0\] has no 'answer_type'"):
        evaluate_vqa({1: "2"}, questions, broken)


def test_okvqa_reports_lemmatized_score_unavailable_without_spacy_model() -> None:
    questions, annotations = _vqa_records()
    report = evaluate_okvqa({1: "two", 2: "yes", 3: "red"}, questions, annotations)
    try:
        import spacy

        spacy.load("en_core_web_sm")
    except (ImportError, OSError):
        assert report["lemmatized"] is False
        assert "en_core_web_sm" in report["unavailable"]["lemmatized"]
        assert report["accuracy"] == report["unlemmatized_accuracy"] == 63.33
    else:
        assert report["lemmatized"] is True


def test_okvqa_scores_lemmatized_predictions() -> None:
    questions, annotations = _vqa_records()
    annotations[2]["answers"] = [{"answer": "dog", "answer_id": i} for i in range(10)]
    lemmas = {"dogs": "dog"}
    report = evaluate_okvqa(
        {1: "2", 2: "no", 3: "dogs"}, questions, annotations, lemmatizer=lambda a: lemmas.get(a, a)
    )
    assert report["lemmatized"] is True
    assert report["per_question"][3] == 1.0
    assert report["unlemmatized_accuracy"] == 66.67  # (1 + 1 + 0) / 3 without the lemma


def test_gqa_exact_match_after_normalisation() -> None:
    questions = {
        "q1": {"answer": "2", "types": {"structural": "query", "semantic": "attr"}},
        "q2": {"answer": "left", "types": {"structural": "choose", "semantic": "rel"}},
        "q3": {"answer": "dog", "types": {"structural": "query", "semantic": "obj"}},
    }
    report = evaluate_gqa({"q1": "Two.", "q2": "the left", "q3": "dogs"}, questions)
    assert report["per_question"] == {"q1": 1.0, "q2": 1.0, "q3": 0.0}
    assert report["accuracy"] == pytest.approx(200 / 3)
    assert report["per_structural_type"] == {"choose": 100.0, "query": 50.0}
    listed = evaluate_gqa({7: "yes"}, [{"question_id": 7, "answer": "yes"}])
    assert listed["accuracy"] == 100.0
    with pytest.raises(ValueError, match="not a string answer"):
        evaluate_gqa({7: None}, [{"question_id": 7, "answer": "yes"}])
    with pytest.raises(ValueError, match="has no 'answer' string"):
        evaluate_gqa({7: "yes"}, [{"question_id": 7}])


def test_evaluation_package_imports_no_torch() -> None:
    code = (
        "import sys, blip2kit.core.evaluation as e; e.evaluate_vqa; "
        "bad = [m for m in ('torch', 'blip2kit.plugins', 'blip2kit.core.model') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
