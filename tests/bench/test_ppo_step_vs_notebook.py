"""bench/ppo_step_vs_notebook.py runs end to end on the tiny default and appends a consistent row (small sizes here;
the figures in bench/RESULTS.md come from the full command named there)."""

from __future__ import annotations

import re

import pytest

from helpers import run_bench_script


def _seconds(cell: str) -> tuple[float, float, float]:
    """'0.23 + 0.37 = 0.60' -> (experience, update, total)."""
    m = re.fullmatch(r"\s*([\d.]+) \+ ([\d.]+) = ([\d.]+)\s*", cell)
    assert m, cell
    return tuple(float(x) for x in m.groups())


def test_ppo_step_vs_notebook_appends_a_consistent_row(repo_root, tiny_artifacts, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    run_bench_script(repo_root, "bench/ppo_step_vs_notebook.py", "--steps", "1", "--append", str(results))
    text = results.read_text()
    assert text.startswith("# Benchmark results\n")  # appended, not overwritten
    assert "- Command: `python bench/ppo_step_vs_notebook.py --steps 1 --append" in text
    row = next(line for line in text.splitlines() if line.startswith("| recipe |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    ours, notebook = _seconds(cells[2]), _seconds(cells[3])
    for experience, update, total in (ours, notebook):
        assert experience > 0 and update > 0 and total == pytest.approx(experience + update, abs=0.011)
    speed_up, experience_speed_up, ceiling = (float(c.rstrip("x")) for c in cells[4:7])
    assert speed_up == pytest.approx(notebook[2] / ours[2], rel=0.1)
    assert ceiling == pytest.approx(notebook[2] / ours[1], rel=0.1) and ceiling >= speed_up
    # One summary per generate() call is slower than batched generation, whatever the machine's load.
    assert experience_speed_up > 1.5
    batched_ms, single_ms = (float(x) for x in cells[7].split(" / "))
    assert batched_ms > 0 and single_ms > 0
