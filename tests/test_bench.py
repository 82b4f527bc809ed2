"""The benchmark commands run end to end on the tiny default and write consistent sections (small sizes here;
the figures in bench/RESULTS.md come from the full commands named there)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

TIMEOUT_S = 600


def _run(repo_root, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=repo_root, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _seconds(cell: str) -> tuple[float, float, float]:
    """'0.23 + 0.37 = 0.60' -> (experience, update, total)."""
    m = re.fullmatch(r"\s*([\d.]+) \+ ([\d.]+) = ([\d.]+)\s*", cell)
    assert m, cell
    return tuple(float(x) for x in m.groups())


def test_ppo_step_vs_notebook_appends_a_consistent_row(repo_root, tiny_artifacts, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    _run(repo_root, "bench/ppo_step_vs_notebook.py", "--steps", "1", "--append", str(results))
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


def test_run_all_measures_every_stage_for_one_and_two_processes(repo_root, tiny_artifacts, tmp_path):
    results = tmp_path / "RESULTS.md"
    _run(repo_root, "bench/run_all.py", "--prompt-len", "16", "--max-new-tokens", "4", "--eval-examples", "4",
         "--reward-texts", "16", "--append", str(results))
    text = results.read_text()
    assert "- Command: `python bench/run_all.py --prompt-len 16" in text
    rows = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in text.splitlines()
                              if line.startswith("| ") and not line.startswith("| stage") and "---" not in line)}
    assert set(rows) == {"rollout generation", "reward scoring", "PPO update (one ppo_step)", "evaluation"}
    for stage, unit, one, two, ratio in rows.values():
        # The ratio comes from unrounded figures: it must lie within what the rounded ones allow.
        half = 0.5 * 10.0 ** -len(one.partition(".")[2])
        one, two, ratio = (float(x.replace(",", "")) for x in (one, two, ratio))
        assert one > half and two > 0, stage
        assert (two - half) / (one + half) - 0.005 <= ratio <= (two + half) / (one - half) + 0.005, stage
