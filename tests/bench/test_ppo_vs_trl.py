"""bench/ppo_vs_trl.py runs end to end on the tiny default against TRL 0.11.4 (the dev extra) and appends a consistent
table (one timed step here; the figures in bench/RESULTS.md come from the full command named there)."""

from __future__ import annotations

import importlib
import random
import re

import numpy as np
import pytest
import torch

from helpers import run_bench_script

PHASES = ("rollout/encode", "rollout/generate", "rollout/score", "rollout/policy_forward", "rollout/reference_forward",
          "ppo/forward", "ppo/backward", "ppo/optimizer_step")

VARIANTS = ("TRL 0.11.4, notebook loop", "TRL 0.11.4, batched generate", "ours (make_experience + ppo_step)")
BATCH = 16  # ppo.batch_size of configs/tiny.yaml


def _rows(text: str) -> dict[tuple[str, str], dict[str, float]]:
    """{(max_new_tokens, variant prefix): cells} of the results table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or len(cells) != 9 or cells[0] == "max_new_tokens":
            continue
        lengths, variant, generation, scoring, update, total, summaries, tokens, faster = cells
        update, forward = update.rstrip(")").split(" (")
        (prefix,) = [v for v in VARIANTS if variant.startswith(v)]
        rows[lengths, prefix] = {
            "generation": float(generation), "scoring": float(scoring), "update": float(update),
            "forward": float(forward), "total": float(total), "summaries": int(summaries), "tokens": int(tokens),
            "faster": float(faster.rstrip("x")),
        }
    return rows


def _check(rows, lengths: str, max_tokens: int) -> None:
    ours = rows[lengths, VARIANTS[2]]
    assert ours["faster"] == 1.0
    for variant in VARIANTS:
        r = rows[lengths, variant]
        assert r["generation"] > 0 and r["scoring"] > 0 and r["update"] > r["forward"] > 0, variant
        # The total is one step's sum, so it is at least each rounded phase (medians of one step: exactly their sum).
        assert r["total"] == pytest.approx(r["generation"] + r["scoring"] + r["update"], abs=0.0021), variant
        # Every variant really made the whole batch of summaries, each within the length limit.
        assert r["summaries"] == BATCH, variant
        assert BATCH <= r["tokens"] <= BATCH * max_tokens, variant
        assert r["faster"] == pytest.approx(r["total"] / ours["total"], rel=0.02, abs=0.01), variant


def _profile(text: str) -> tuple[float, dict[str, float]]:
    """(wall seconds, {phase: ms}) of the --profile section."""
    (wall,) = re.findall(r"One step of ours under torch.profiler \(32 new tokens\): ([0-9.]+) s wall", text)
    phases = dict(re.findall(r"^\| ((?:rollout|ppo)/\w+|other) \| [^|]+ \| (-?[0-9.]+) \|", text, re.MULTILINE))
    return float(wall), {k: float(v) for k, v in phases.items()}


def test_recipe_lengths_table_has_the_three_variants(repo_root, tiny_artifacts, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    proc = run_bench_script(repo_root, "bench/ppo_vs_trl.py", "--steps", "1", "--profile", "--append", str(results))
    text = results.read_text()
    assert text.startswith("# Benchmark results\n")  # appended, not overwritten
    assert "- Command: `python bench/ppo_vs_trl.py --steps 1 --profile --append" in text
    assert "trl 0.11.4" in text  # the versions line names the TRL it ran against
    rows = _rows(text)
    assert set(rows) == {("32", v) for v in VARIANTS}
    _check(rows, "32", 32)
    assert _rows(proc.stdout) == rows  # the printed table is the appended one
    assert "vs TRL batched" in proc.stdout and "vs TRL notebook loop" in proc.stdout
    # The profile: every phase of our step ran, and the phases and the rest add up to the step's wall time.
    wall, phases = _profile(text)
    assert set(phases) == {*PHASES, "other"}
    assert all(phases[p] > 0 for p in PHASES), phases
    assert sum(phases.values()) == pytest.approx(wall * 1e3, abs=1.0)
    assert "| `aten::" in text  # the operator table
    (warmup,) = re.findall(r"Our warm-up step \(not in the medians\): 32 new tokens ([0-9.]+) s\.", text)
    assert float(warmup) > 0


def test_sampled_lengths_and_config_overrides(repo_root, tiny_artifacts, tmp_path):
    # Short sampled lengths stand in for --notebook-lengths' LengthSampler(100, 400), which takes a minute here:
    # the same code paths (per-prompt draws in the loop, per-call draws in the batched variant and ours).
    results = tmp_path / "RESULTS.md"
    run_bench_script(repo_root, "bench/ppo_vs_trl.py", "--steps", "1", "--rollout.max_new_tokens_min", "4",
                     "--rollout.max_new_tokens", "12", "--ppo.mini_batch_size", "8", "--append", str(results))
    text = results.read_text()
    assert "mini_batch_size 8," in text  # the overrides reached the config both sides use
    assert "overrides --rollout.max_new_tokens_min 4 --rollout.max_new_tokens 12 --ppo.mini_batch_size 8" in text
    rows = _rows(text)
    assert set(rows) == {("4-12 (sampled)", v) for v in VARIANTS}
    _check(rows, "4-12 (sampled)", 12)
    assert "Our warm-up step (not in the medians): 4-12 (sampled) new tokens" in text


def test_interleaved_variants_draw_what_they_would_draw_alone(repo_root, monkeypatch):
    """The variants take turns step by step, in an order rotating from round to round, each on its own python, numpy
    and torch random state: each draws the numbers it draws when timed alone; the first step is the warm-up, the rest
    give the medians."""
    monkeypatch.syspath_prepend(str(repo_root / "bench"))
    bench = importlib.import_module("ppo_vs_trl")

    calls: list[int] = []

    def stepper(seed: int):
        bench.seed_everything(seed)
        draws: list[tuple[float, float, float]] = []

        def step() -> dict[str, float]:
            calls.append(seed)
            draws.append((random.random(), float(np.random.rand()), float(torch.rand(1))))
            return {"total": float(len(draws))}

        return (step, bench.RandomState()), draws

    alone = {}
    for seed in (1, 2):
        timed, alone[seed] = stepper(seed)
        bench.interleave({"alone": timed}, 3)
    (first, first_draws), (second, second_draws) = stepper(1), stepper(2)
    calls.clear()
    results = bench.interleave({"first": first, "second": second}, 3)
    assert calls == [1, 2, 2, 1, 1, 2, 2, 1]  # the order rotates from round to round
    assert first_draws == alone[1] and second_draws == alone[2] and len(first_draws) == 4
    assert first_draws != second_draws
    assert results["first"] == {"total": 3.0, "warmup": 1.0}  # steps 2-4 timed (median 3), step 1 the warm-up
