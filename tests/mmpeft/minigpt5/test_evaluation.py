import pytest

from mmpeft.minigpt5.evaluation import told_figures


def test_telling_counts_sentences_and_scores_them_against_the_true_and_another_story():
    truths = ["the dog runs to the red ball", "a cat sleeps on the mat"]
    texts = ["the dog runs to the ball", "the top right."]  # the second tells nothing: three words
    figures = told_figures(texts, truths)
    assert figures["told_share"] == 0.5
    assert figures["told_word_f1"] == pytest.approx((2 * 6 / (6 + 7) + 2 * 1 / (3 + 6)) / 2)  # "the" in both
    # the control: each answer against the other story's sentence ("the" is all they share)
    assert figures["told_word_f1_shuffled"] == pytest.approx((2 * 1 / (6 + 6) + 2 * 1 / (3 + 7)) / 2)
