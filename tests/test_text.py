"""The shared text helpers: one table layout, one number format, one "did you mean"."""

import pytest

from loopmoe.text import human, markdown_table, suggest


def test_markdown_table_is_aligned_and_marks_right_aligned_columns():
    table = markdown_table(("name", "n"), [("a", 1), ("bbb", 22)], align="lr")
    assert table.splitlines() == [
        "| name |  n |",
        "|------|---:|",
        "| a    |  1 |",
        "| bbb  | 22 |",
    ]
    with pytest.raises(ValueError, match="2 cells"):
        markdown_table(("a", "b", "c"), [(1, 2)])


def test_human_and_suggest():
    assert (human(1234567), human(999), human(2.5e9)) == ("1.23M", "999", "2.50B")
    assert suggest("max_step", ["max_steps", "seed"], prefix="train.") == "did you mean 'train.max_steps'?"
    assert suggest("zzz", ["max_steps"]) == ""
