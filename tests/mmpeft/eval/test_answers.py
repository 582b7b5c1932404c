from pathlib import Path

import pytest

from mmpeft.eval.answers import image_control, swapped_images


def test_the_image_swap_control_asks_each_question_about_another_image():
    rows = [{"id": i, "image": Path(f"{im}.jpg"), "q": "?", "a": "x"} for i, im in enumerate("aabcc")]
    swapped = swapped_images(rows)
    assert [r["image"] for r in swapped] == [Path("b.jpg")] * 2 + [Path("c.jpg")] + [Path("a.jpg")] * 2
    assert all(s["image"] != r["image"] and s["q"] == r["q"] for s, r in zip(swapped, rows, strict=True))
    with pytest.raises(ValueError, match="at least two images"):
        swapped_images(rows[:2])


def test_the_control_reports_the_gap_by_question_type():
    metrics, text = image_control({"accuracy": 0.6, "by_type": {"colour": 0.8, "count": 0.4}},
                                  {"accuracy": 0.45, "by_type": {"colour": 0.5, "count": 0.4}})
    assert metrics["image_gap"] == pytest.approx(0.15) and metrics["answer_accuracy_image_swapped"] == 0.45
    assert "the image carries +0.150" in text and "colour 0.80 vs 0.50" in text
