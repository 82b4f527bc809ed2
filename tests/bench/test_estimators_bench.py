"""bench/estimators.py runs PPO, RLOO and GRPO end to end on the tiny model, each in its own process, and appends a
consistent table (one timed step on small settings here; real figures come from the command bench/RESULTS.md names)."""

from __future__ import annotations

import json

import pytest

from helpers import run_bench_script

BATCH, K, MAX_NEW_TOKENS = 8, 2, 8
ESTIMATORS = {"gae": (1, BATCH), "rloo": (K, BATCH // K), "group": (K, BATCH // K)}  # k, prompts per step


def _number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x"))


def _rows(text: str) -> dict[str, dict[str, float]]:
    """{estimator: cells} of the results table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or len(cells) != 13 or cells[0] == "estimator":
            continue
        estimator, *numbers = cells
        update, forward = numbers[6].rstrip(")").split(" (")
        numbers[6:7] = [update, forward]
        keys = ("k", "prompts", "summaries", "tokens", "generation", "scoring", "update", "forward", "total", "speed",
                "peak_mib", "growth_mib", "trainable")
        rows[estimator.split()[0]] = dict(zip(keys, map(_number, numbers)))
    return rows


def test_ppo_rloo_grpo_same_summaries_per_step(repo_root, tiny_artifacts, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    proc = run_bench_script(
        repo_root, "bench/estimators.py", "--steps", "1", "--samples-per-prompt", str(K),
        "--ppo.batch_size", str(BATCH), "--rollout.max_new_tokens", str(MAX_NEW_TOKENS),
        "--data.max_prompt_tokens", "64", "--data.path", str(tiny_artifacts.dialogsum),
        "--model.name_or_path", str(tiny_artifacts.t5), "--reward.model_name_or_path", str(tiny_artifacts.roberta),
        "--append", str(results))
    text = results.read_text()
    assert text.startswith("# Benchmark results\n")  # appended, not overwritten
    assert "## One RL step: PPO vs RLOO vs GRPO at the same summaries per step (tiny model, float32, on cpu)" in text
    assert "- Command: `python bench/estimators.py --steps 1 --samples-per-prompt 2 --ppo.batch_size 8" in text
    assert f"(PPO: {BATCH} prompts x 1; RLOO, GRPO: {BATCH // K} prompts x {K})" in text
    assert "KL: gae in the reward; rloo in the reward; group in the loss" in text  # ppo.kl_penalty auto
    rows = _rows(text)
    assert set(rows) == set(ESTIMATORS)
    assert _rows(proc.stdout) == rows  # the printed table is the appended one

    for estimator, (k, prompts) in ESTIMATORS.items():
        r = rows[estimator]
        # The same work per step: every estimator made the whole batch of summaries, from batch / k prompts.
        assert (r["k"], r["prompts"], r["summaries"]) == (k, prompts, BATCH), estimator
        assert BATCH <= r["tokens"] <= BATCH * MAX_NEW_TOKENS, estimator
        assert r["generation"] > 0 and r["scoring"] > 0 and r["update"] > r["forward"] > 0, estimator
        # Medians of one step: the total is exactly the sum of its phases (up to their rounding).
        assert r["total"] == pytest.approx(r["generation"] + r["scoring"] + r["update"], abs=0.0021), estimator
        assert r["speed"] == pytest.approx(rows["gae"]["total"] / r["total"], rel=0.02, abs=0.01), estimator
        assert r["peak_mib"] > 0 and 0 <= r["growth_mib"] < r["peak_mib"], estimator
    assert rows["gae"]["speed"] == 1.0

    # The critic-free estimators build no value head: exactly its Linear(d_model, 1) fewer trainable parameters.
    d_model = json.loads((tiny_artifacts.t5 / "config.json").read_text())["d_model"]
    for estimator in ("rloo", "group"):
        assert rows["gae"]["trainable"] - rows[estimator]["trainable"] == d_model + 1, estimator
