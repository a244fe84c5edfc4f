"""Scoring of the eight CoIN tasks, the two fixed public bugs, and the error classes."""

import pytest

from sefe_fast.scoring import box_iou, classify, grounding_iou, parse_box, score
from sefe_fast.tasks import COIN_TASKS
from sefe_fast.vqa_normalize import normalize_vqa_answer, vqa_soft_accuracy

# ---------------------------------------------------------------- ScienceQA


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", 1.0),
        ("B.", 1.0),
        ("(B)", 1.0),
        ("B. Mercury is closest.", 1.0),
        ("The answer is B.", 1.0),
        (" B\n", 1.0),
        ("A", 0.0),
        ("The answer is C.", 0.0),
        ("Mercury", 0.0),
        ("[0.1, 0.2, 0.3, 0.4]", 0.0),
        ("", 0.0),
    ],
)
def test_scienceqa_reads_the_option_letter(prediction, expected):
    assert score("ScienceQA", prediction, "B") == expected


def test_scienceqa_gold_may_carry_option_text():
    assert score("ScienceQA", "C", "C. oxygen") == 1.0


@pytest.mark.parametrize(
    ("prediction", "legacy_score"),
    [
        ("B", 1.0),  # the text itself is one of A-E
        ("B. Mercury is closest.", 1.0),  # "X. " at the start
        ("The answer is B.", 1.0),  # the regular expression, matched once
        ("Because of gravity. The answer is B!", 1.0),  # its "." matches any character
        ("The answer is B", 0.0),  # ... but needs one: at the very end it fails
        ("The answer is B. The answer is B.", 0.0),  # two matches: failed parse
        ("b", 0.0),  # lower case is not an option
        ("B.", 0.0),  # "B." is neither a bare letter nor "B. " with text
        ("(B)", 0.0),
        ("A", 0.0),
    ],
)
def test_scienceqa_legacy_is_sefe_eval_science_qa(prediction, legacy_score):
    """Official rule (SEFE's llava/eval/CoIN/eval_science_qa.py, behind the paper's numbers):
    a reply that is exactly one of A-E is that letter; else a reply of 3+ characters whose
    first is one of A-E and whose next two are ". " is its first letter; else the pattern
    "The answer is ([A-Z])." (unescaped dot) must match exactly once and gives the letter;
    anything else is FAILED and counts as wrong. The fixed mode also reads "B." and "(B)"."""
    assert score("ScienceQA", prediction, "B", legacy=True) == legacy_score


def test_scienceqa_bad_gold_is_an_error():
    with pytest.raises(ValueError, match="not an option letter"):
        score("ScienceQA", "B", "Mercury")


# ---------------------------------------------------------------- TextVQA / VQA


def test_vqa_normalisation_steps():
    assert normalize_vqa_answer("The Black-and-White cat.") == "black and white cat"
    assert normalize_vqa_answer("Two dogs!") == "2 dogs"
    assert normalize_vqa_answer("dont") == "don't"
    assert normalize_vqa_answer("1,000") == "1000"
    assert normalize_vqa_answer("3.5 m.") == "3.5 m"
    assert normalize_vqa_answer("its") == "its"  # a real word is not a contraction
    assert normalize_vqa_answer("  an\tApple\n") == "apple"


@pytest.mark.parametrize(
    ("matches", "expected"),
    # k of 10 humans gave the answer. Leave-one-out over the 10 subsets of 9:
    # k=1: 1 subset has 0 matches, 9 have 1 -> (0 + 9 * 1/3) / 10 = 0.3
    # k=2: 2 subsets have 1, 8 have 2 -> (2/3 + 8 * 2/3) / 10 = 0.6
    # k=3: 3 subsets have 2, 7 have 3 -> (3 * 2/3 + 7) / 10 = 0.9
    # k=4: 4 subsets have 3, 6 have 4 -> all min(.,1) = 1 -> 1.0
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_textvqa_soft_accuracy_by_hand(matches, expected):
    answers = ["Two"] * matches + ["three"] * (10 - matches)
    assert score("TextVQA", "2", answers) == pytest.approx(expected)


def test_textvqa_single_string_answer_is_normalised_exact_match():
    assert score("TextVQA", "The Coca-Cola.", "coca cola") == 1.0
    assert score("TextVQA", "pepsi", "coca cola") == 0.0


def test_soft_accuracy_needs_answers():
    with pytest.raises(ValueError, match="at least one"):
        vqa_soft_accuracy("x", [])


def test_vqav2_and_vizwiz_case_insensitive_exact_match():
    assert score("VQAv2", "Yes", "yes") == 1.0
    assert score("VQAv2", "yes.", "yes") == 0.0
    assert score("VizWiz", "UNANSWERABLE", "unanswerable") == 1.0
    assert score("VizWiz", "a dog", "dog") == 0.0
    # A list of several human answers is scored with soft accuracy.
    assert score("VQAv2", "2", ["two", "2", "3"] + ["4"] * 7) == pytest.approx(0.6)


# ---------------------------------------------------------------- ImageNet (bug 2)


def test_imagenet_substring_either_way():
    assert score("ImageNet", "goldfish", "goldfish") == 1.0
    assert score("ImageNet", "a goldfish in a bowl", "goldfish") == 1.0
    assert score("ImageNet", "fish", "goldfish") == 1.0
    assert score("ImageNet", "shark", "goldfish") == 0.0


def test_imagenet_empty_prediction_is_wrong_but_legacy_counts_it_right():
    assert score("ImageNet", "", "goldfish") == 0.0
    assert score("ImageNet", "   ", "goldfish") == 0.0
    assert score("ImageNet", "", "goldfish", legacy=True) == 1.0


# ---------------------------------------------------------------- GQA, OCRVQA


def test_gqa_lowercase_strip_trailing_period():
    assert score("GQA", "Left.", "left") == 1.0
    assert score("GQA", "left", "left") == 1.0
    assert score("GQA", "on the left", "left") == 0.0


def test_ocrvqa_exact_and_unanswerable():
    assert score("OCRVQA", "Harry Potter", "harry potter") == 1.0
    assert score("OCRVQA", "Harry", "harry potter") == 0.0
    assert score("OCRVQA", "Unanswerable", "Unanswerable") == 0.0


# ---------------------------------------------------------------- Grounding (bug 1)


def test_parse_box_whole_box():
    assert parse_box("[0.12, 0.34, 0.56, 0.78]") == (0.12, 0.34, 0.56, 0.78)
    assert parse_box("0.12,0.34,0.56,0.78") == (0.12, 0.34, 0.56, 0.78)
    assert parse_box("[0.1, 0.2, 0.3]") is None
    assert parse_box("B") is None
    assert parse_box("[0.1, 0.2, 0.3, nan]") is None


def test_box_iou_by_hand():
    # Two unit squares overlapping by half: inter 0.5, union 1.5.
    assert box_iou((0, 0, 1, 1), (0.5, 0, 1.5, 1)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert box_iou((1, 1, 0, 0), (0, 0, 1, 1)) == 0.0  # inverted box: zero area


def test_grounding_threshold_is_strictly_above_half():
    assert score("Grounding", "[0, 0, 1, 1]", "[0, 0, 1, 1]") == 1.0
    # IoU = 0.5 exactly: (0,0,1,1) vs (0,0,1,0.5): inter 0.5, union 1.
    assert score("Grounding", "[0, 0, 1, 0.5]", "[0, 0, 1, 1]") == 0.0
    assert score("Grounding", "[0, 0, 1, 0.6]", "[0, 0, 1, 1]") == 1.0


def test_grounding_legacy_drops_the_last_digit():
    gold = "[0.12, 0.34, 0.56, 0.78]"
    # Fixed: the whole box, IoU 1. Legacy reads y2 = 0.7: IoU = (0.44*0.36)/(0.44*0.44).
    assert grounding_iou(gold, gold) == pytest.approx(1.0)
    assert grounding_iou(gold, gold, legacy=True) == pytest.approx(0.36 / 0.44)


def test_grounding_legacy_bug_changes_the_verdict():
    # y2 = 0.19 read as 0.1 = y1: a zero-height box, IoU 0, wrong in legacy mode.
    box = "[0.10, 0.10, 0.20, 0.19]"
    assert score("Grounding", box, box) == 1.0
    assert score("Grounding", box, box, legacy=True) == 0.0


def test_grounding_unparseable_scores_zero():
    assert score("Grounding", "the dog on the left", "[0, 0, 1, 1]") == 0.0
    assert score("Grounding", "", "[0, 0, 1, 1]") == 0.0
    assert score("Grounding", "B", "[0, 0, 1, 1]", legacy=True) == 0.0


def test_grounding_gold_as_list_and_bad_gold():
    assert score("Grounding", "[0, 0, 1, 1]", [0, 0, 1, 1]) == 1.0
    with pytest.raises(ValueError, match="gold box"):
        score("Grounding", "[0, 0, 1, 1]", "left dog")


# ---------------------------------------------------------------- errors


def test_unknown_task_is_a_value_error():
    with pytest.raises(ValueError, match="unknown CoIN task"):
        score("MNIST", "1", "1")
    with pytest.raises(ValueError, match="unknown CoIN task"):
        classify("MNIST", "1", "1")


def test_list_gold_for_a_single_answer_task_is_an_error():
    with pytest.raises(ValueError, match="one gold answer"):
        score("GQA", "left", ["left", "right"])
    assert score("GQA", "left", ["left"]) == 1.0


def test_every_task_scores_into_unit_interval():
    golds = {"ScienceQA": "A", "Grounding": "[0, 0, 1, 1]", "TextVQA": ["x"] * 10}
    for task in COIN_TASKS:
        value = score(task, "A", golds.get(task, "a"))
        assert 0.0 <= value <= 1.0


# ---------------------------------------------------------------- classify

BOX = "[0.10, 0.20, 0.30, 0.40]"
LETTER = "C"
WORD = "cat"
EXPLANATION = " ".join(["word"] * 40)


@pytest.mark.parametrize(
    ("task", "gold", "prediction", "expected"),
    [
        # letter tasks: the right letter is correct; a wrong letter is essential;
        # a box, a word or an explanation is superficial.
        ("ScienceQA", "B", "B", "correct"),
        ("ScienceQA", "B", LETTER, "essential"),
        ("ScienceQA", "B", BOX, "superficial"),
        ("ScienceQA", "B", WORD, "superficial"),
        ("ScienceQA", "B", EXPLANATION, "superficial"),
        ("ScienceQA", "B", "", "superficial"),
        # box tasks
        ("Grounding", BOX, BOX, "correct"),
        ("Grounding", BOX, "[0.60, 0.60, 0.90, 0.90]", "essential"),
        ("Grounding", BOX, LETTER, "superficial"),
        ("Grounding", BOX, WORD, "superficial"),
        ("Grounding", BOX, EXPLANATION, "superficial"),
        # short-answer tasks
        ("GQA", "dog", "dog", "correct"),
        ("GQA", "dog", WORD, "essential"),
        ("GQA", "dog", BOX, "superficial"),
        ("GQA", "dog", LETTER, "superficial"),
        ("GQA", "dog", EXPLANATION, "superficial"),
        ("VQAv2", "2", "3", "essential"),
        ("VizWiz", "dog", "B", "superficial"),
        ("OCRVQA", "dune", "[0, 0, 1, 1]", "superficial"),
        ("TextVQA", ["dog"] * 10, "cat", "essential"),
        ("TextVQA", ["dog"] * 10, "A", "superficial"),
        ("ImageNet", "goldfish", "", "superficial"),
        ("ImageNet", "goldfish", "shark", "essential"),
    ],
)
def test_classify_each_format_pair(task, gold, prediction, expected):
    assert classify(task, prediction, gold) == expected


def test_classify_partial_soft_credit_is_correct():
    answers = ["dog"] + ["cat"] * 9
    assert score("TextVQA", "dog", answers) == pytest.approx(0.3)
    assert classify("TextVQA", "dog", answers) == "correct"


def test_classify_follows_legacy_scoring():
    assert classify("ImageNet", "", "goldfish") == "superficial"
    assert classify("ImageNet", "", "goldfish", legacy=True) == "correct"
