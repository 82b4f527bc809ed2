"""bench/run_all.py runs end to end on the tiny default and writes a consistent section (small sizes here; the
figures in bench/RESULTS.md come from the full command named there)."""

from __future__ import annotations

from helpers import run_bench_script


def test_run_all_measures_every_stage_for_one_and_two_processes(repo_root, tiny_artifacts, tmp_path):
    results = tmp_path / "RESULTS.md"
    run_bench_script(repo_root, "bench/run_all.py", "--prompt-len", "16", "--max-new-tokens", "4", "--eval-examples", "4",
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
