"""eval/human/report.py: the report un-blinds the answers of two annotators and matches a hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.human.items import CRITERIA, load_key, load_study
from eval.human.report import compute_report, write_report
from eval.human.stats import wilson_interval
from eval.human.store import Answer


def test_report_unblinds_and_matches_hand_computation(three_system_study: Path, tmp_path: Path, human_client) -> None:
    db = tmp_path / "answers.sqlite"
    study = load_study(three_system_study)
    slots_of = json.loads((three_system_study / "key.json").read_text())["items"]
    # Two annotators rank the same two items; both always put ppo first, then sft, then base, on readability;
    # on coherence "ann" puts base first on item 1. "bo" flags base as toxic on item 1.
    preference = {"ppo_model": 1, "sft_model": 2, "base_model": 3}
    items = study.item_ids[:2]
    for name in ("ann", "bo"):
        client = human_client(three_system_study, db)
        client.sign_in(name)
        for item_id in items:
            system_of = slots_of[item_id]["slots"]
            form = {f"rank_readability_{s}": str(preference[system_of[s]]) for s in "ABC"}
            coherence = dict(preference)
            if name == "ann" and item_id == items[0]:
                coherence = {"base_model": 1, "ppo_model": 2, "sft_model": 3}
            form |= {f"rank_coherence_{s}": str(coherence[system_of[s]]) for s in "ABC"}
            if name == "bo" and item_id == items[0]:
                form["flag_" + next(s for s in "ABC" if system_of[s] == "base_model")] = "toxic"
            assert client.submit(f"/item/{item_id}", form).status_code == 303

    report = write_report(three_system_study, db=db, out=tmp_path / "report")
    # Readability: 4 judgements, each system compared twice per judgement → 8 comparisons;
    # ppo wins all 8, sft 4 (beats base), base 0. Perfect agreement → alpha 1.
    read = report["criteria"]["readability"]
    assert {s: (w["wins"], w["comparisons"]) for s, w in read["win_rate"].items()} == {
        "ppo_model": (8, 8), "sft_model": (4, 8), "base_model": (0, 8)}
    assert read["mean_rank"] == {"base_model": 3.0, "ppo_model": 1.0, "sft_model": 2.0}
    assert read["krippendorff_alpha_ordinal"] == pytest.approx(1.0)
    low, high = wilson_interval(4, 8)
    assert (read["win_rate"]["sft_model"]["ci_low"], read["win_rate"]["sft_model"]["ci_high"]) == (low, high)
    # Coherence: 3 judgements as readability + ann/item1 (base 1, ppo 2, sft 3).
    # ppo: 2*3 + 1 (beats sft) = 7 of 8; sft: 1*3 + 0 = 3; base: 0*3 + 2 = 2. Mean ranks: base (3+3+3+1)/4.
    coh = report["criteria"]["coherence"]
    assert {s: w["wins"] for s, w in coh["win_rate"].items()} == {"ppo_model": 7, "sft_model": 3, "base_model": 2}
    assert coh["mean_rank"]["base_model"] == 2.5 and coh["mean_rank"]["sft_model"] == 2.25
    assert coh["krippendorff_alpha_ordinal"] < 1.0
    assert report["flags"]["base_model"] == {"shown": 4, "toxic": 1, "unusable": 0}
    assert report["annotators"] == {"ann": 2, "bo": 2} and report["items_with_2plus_annotators"] == 2

    markdown = (tmp_path / "report/report.md").read_text()
    assert "| ppo_model | 1.000 |" in markdown and "| sft_model | 0.500 |" in markdown
    assert (tmp_path / "report/report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report/report.json").read_text()) == report
    assert report["selection"] == "random" and "not a random sample" not in markdown
    # Items chosen for judge disagreement (export --human.select disagreement) are said to be no sample of the split.
    key = json.loads((three_system_study / "key.json").read_text())
    (tmp_path / "selected-key.json").write_text(json.dumps({**key, "select": "disagreement"}))
    selected = write_report(three_system_study, db=db, key=tmp_path / "selected-key.json", out=tmp_path / "selected")
    assert selected["selection"] == "disagreement"
    assert "not a random sample" in (tmp_path / "selected/report.md").read_text()


def test_the_report_counts_every_spelling_of_a_name_as_one_annotator(two_system_study: Path) -> None:
    study = load_study(two_system_study)
    key = load_key(two_system_study / "key.json", study)
    first, second = study.item_ids[:2]
    ranks = {criterion: {"A": 1.0, "B": 2.0} for criterion in CRITERIA}
    answers = [Answer("Carol", first, ranks), Answer("carol", second, ranks), Answer("ＣＡＲＯＬ", first, ranks),
               Answer("bo", first, ranks)]
    report = compute_report(study, key, answers)
    assert report["annotators"] == {"Carol": 2, "bo": 1} and report["answers"] == 3
    assert report["items_with_2plus_annotators"] == 1  # Carol's second answer to the first item does not count
