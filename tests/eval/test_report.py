"""eval/report.py: the report of an evaluation run (report.md, its tables and plots), on the runs of eval.evaluate
shared through the `runs` fixture of tests/eval/conftest.py."""

from __future__ import annotations

import pytest

from eval.report import qualitative_rows
from helpers import read_eval_examples


def test_report_has_tables_sorted_by_improvement_and_readable_plots(runs):
    _, one, two, _ = runs
    out = one / "eval"
    report = (out / "report.md").read_text()
    assert "| base | none (base) | 7 |" in report and "## Before → after" in report
    # Qualitative table: 2 best and 2 worst reward improvements, then a row for the 3 in between.
    rows = [line for line in report.split("## Qualitative")[1].splitlines() if line.startswith("| test_")]
    improvements = [float(line.rstrip(" |").rsplit("|", 1)[1]) for line in rows]
    assert len(rows) == 4 and improvements == sorted(improvements, reverse=True)
    assert "*3 more*" in report
    expected = qualitative_rows(read_eval_examples(one), "base", "ppo")
    assert improvements[0] == pytest.approx(expected[0]["improvement"], abs=1e-3)
    for png in ("toxicity.png", "ppo_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in report
    assert not (two / "eval" / "ppo_curves.png").exists()  # no log given there and none at <output_dir>/ppo
