"""The degeneration measure (rosa_ext.harness.degeneration) and the guess control, on hand-written answers
(the copy-and-guess answers are quoted from the committed Qwen2.5-Coder runs)."""
import pytest

from rosa_ext.harness.controls import guess_text
from rosa_ext.harness.conversation import DEFAULT_FEEDBACK as FB
from rosa_ext.harness.degeneration import chains, copies_feedback, degeneration_table, derivation, label_conversation, sensible_solved_at

COPY = ("Your answer is incorrect. Please check your reasoning and try again. Put the final answer in "
        "\\boxed{1180}.")


def test_copies_feedback():
    assert copies_feedback(COPY, FB)
    assert not copies_feedback("59 * 60 = 3540. The answer is \\boxed{3540}.", FB)
    assert not copies_feedback("Your answer is 12.", FB)  # 3 words shared only
    with pytest.raises(ValueError):
        copies_feedback("x", FB, n=0)


@pytest.mark.parametrize("question, text, want", [
    ("What is 59 * 60?", COPY, "none"),
    ("What is 47 * 14?", "47 * 14 = 628. The answer is \\boxed{628}.", "derived"),  # worked out, wrongly
    ("What is 47 * 14?", "47 * 14 = 47 * 10 + 47 * 4 = 470 + 188 = 658. The answer is \\boxed{658}.", "sound"),
    ("What is 32 + 8 - 5?", "32 + 8 = 40. 40 - 5 = 35. The answer is \\boxed{35}.", "sound"),
    ("Zoe has 5 apples and gives 3 away.", "Zoe has 5 apples - 3 apples = 2 apples left. \\boxed{2}", "sound"),
    ("Max has 6 pencils and gets 5 more.", "Max has 11 pencils left. The answer is \\boxed{11}.", "none"),
    ("What is 23 * 17?", "23 * 17 = 381. The answer is \\boxed{382}.", "none"),  # the guess control's answer
    ("What is 23 * 17?", "23 \\times 17 = 391. So \\boxed{391}", "sound"),
    ("What is 23 * 17?", "20 * 17 = 391. \\boxed{391}", "derived"),  # wrong arithmetic, not from the question
    ("What is 23 * 17?", "4 + 387 = 391. \\boxed{391}", "derived"),  # right arithmetic, numbers not grounded
    ("What is 23 * 17?", "23 * 17 = 391", "unboxed"),
])
def test_derivation(question, text, want):
    assert derivation(text, question) == want


def test_chains_skip_the_box_and_break_at_words():
    ch = chains("so 9 - 1 = 8 stickers. The answer is \\boxed{8 = 8}.")
    assert [c.values for c in ch] == [[8.0, 8.0]] and ch[0].consistent and ch[0].computes


def test_labels_walk_step_repeat_and_sensible():
    texts = ["\\boxed{40}", "\\boxed{42}", "\\boxed{44}", "\\boxed{44}", "1 + 1 = 2 \\boxed{2}"]
    lab = label_conversation(texts, "What is 1 + 1?", "2", FB)
    assert [x.small_step for x in lab] == [False, True, True, False, False]
    assert [x.walk for x in lab] == [False, False, True, False, False]
    assert [x.repeat for x in lab] == [False, False, False, True, False]
    assert [x.sensible for x in lab] == [False, False, False, False, True]
    # a right number copied into the feedback sentence is a correction, not a sensible one
    copy_right = ["36 + 2 - 2 = 34. \\boxed{34}", COPY.replace("1180", "36")]
    assert label_conversation(copy_right, "What is 36 + 2 - 2?", "36", FB)[1].correct
    assert sensible_solved_at(copy_right, "What is 36 + 2 - 2?", "36", FB, 1) is None
    assert sensible_solved_at(["x", "36 + 2 - 2 = 36. \\boxed{36}"], "What is 36 + 2 - 2?", "36", FB, 1) == 1
    assert sensible_solved_at(["\\boxed{36}"], "q", "36", FB, 0) == 0  # turn 1 counts as it is


def test_degeneration_table_counts():
    convs = [{"question": "What is 59 * 60?", "answer": "3540",
              "turns": [{"text": "59 * 60 = 3570. \\boxed{3570}"}, {"text": COPY},
                        {"text": COPY.replace("1180", "1260")}, {"text": COPY.replace("1180", "1420")}]},
             {"question": "What is 2 + 2?", "answer": "4", "turns": [{"text": "2 + 2 = 4. \\boxed{4}"}]}]
    t = degeneration_table(convs, 4, FB)
    assert t["all"]["answers"] == 3 and t["all"]["copies_feedback"] == 3 and t["all"]["underived"] == 3
    assert t["all"]["walk"] == 1 and t["per_turn"]["4"]["walk"] == 1 and t["conversations_with_walk"] == 1
    assert t["all"]["sensible"] == 0 and t["first_turn_failures"] == 1


def test_guess_text():
    first = "23 * 17 = 381. The answer is \\boxed{381}."
    assert [guess_text(first, k) for k in (1, 2, 3, 4)] == [
        first.replace("{381}", "{382}"), first.replace("{381}", "{380}"), first.replace("{381}", "{383}"),
        first.replace("{381}", "{379}")]
    assert guess_text("no box here", 1) == "no box here"
    with pytest.raises(ValueError):
        guess_text(first, 0)
