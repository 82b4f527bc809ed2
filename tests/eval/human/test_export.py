"""eval/human/export.py: a study exported from eval.evaluate's examples is blinded, seeded and keyed; bad input
is refused."""

from __future__ import annotations

import csv
import inspect
import json
import random
from pathlib import Path

import pytest

from eval.human.export import export_study
from eval.human.items import load_study
from train.config import HumanConfig
from train.errors import ConfigError, DataError
from helpers import write_eval_examples


def test_export_is_blinded_seeded_and_keyed(tmp_path: Path, two_system_study: Path, three_system_study: Path) -> None:
    items_text = (two_system_study / "items.jsonl").read_text()
    assert "base_model" not in items_text and "ppo_model" not in items_text  # system names hidden
    study = load_study(two_system_study)
    assert len(study.items) == 5 and study.slots == ("A", "B")

    # The key recovers, for every item and slot, exactly the summary that system wrote for that example.
    key = json.loads((two_system_study / "key.json").read_text())
    source = {json.loads(l)["id"]: json.loads(l) for l in (tmp_path / "eval/examples.jsonl").read_text().splitlines()}
    for item in study.items:
        entry = key["items"][item.item_id]
        example = source[entry["example_id"]]
        assert item.dialogue == example["dialogue"]
        for slot, text in item.summaries:
            assert text == example["systems"][entry["slots"][slot]]["summary"]
    assert len({key["items"][i.item_id]["example_id"] for i in study.items}) == 5  # 5 distinct dialogues

    # Slot orders vary per item (3 systems, 6 items with seed 1 give more than one order).
    key3 = json.loads((three_system_study / "key.json").read_text())
    orders = {tuple(e["slots"][s] for s in "ABC") for e in key3["items"].values()}
    assert len(orders) > 1

    # Same inputs and seed: byte-identical items; another seed: a different sample or order.
    again = export_study(tmp_path / "eval", tmp_path / "again", n=5, seed=3)
    assert (again / "items.jsonl").read_bytes() == (two_system_study / "items.jsonl").read_bytes()
    other = export_study(tmp_path / "eval", tmp_path / "other", n=5, seed=4)
    assert (other / "items.jsonl").read_bytes() != (two_system_study / "items.jsonl").read_bytes()

    # The CSV for other tools carries the same blinded content.
    with open(two_system_study / "items.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["item_id"] for r in rows] == study.item_ids
    assert all(r["summary_A"] == i.summaries[0][1] and r["summary_B"] == i.summaries[1][1] and r["dialogue"] == i.dialogue
               for r, i in zip(rows, study.items))
    assert "base_model" not in (two_system_study / "items.csv").read_text()


def test_export_defaults_are_the_human_sections() -> None:
    # One default per setting: export_study's n and seed default to human.n and human.seed.
    parameters = inspect.signature(export_study).parameters
    assert (parameters["n"].default, parameters["seed"].default) == (HumanConfig().n, HumanConfig().seed)


def test_export_rejects_bad_input(tmp_path: Path) -> None:
    eval_dir = write_eval_examples(tmp_path / "eval", 4, ["a", "b"])
    with pytest.raises(DataError, match="examples not found"):
        export_study(tmp_path / "nowhere", tmp_path / "h0")
    with pytest.raises(ConfigError, match="at least 2 systems"):
        export_study(eval_dir, tmp_path / "h1", systems=["a"])
    with pytest.raises(DataError, match=r"no summary from \['c'\]"):
        export_study(eval_dir, tmp_path / "h2", systems=["a", "c"])
    export_study(eval_dir, tmp_path / "h3", n=2)
    with pytest.raises(ConfigError, match="already exists.*--force"):
        export_study(eval_dir, tmp_path / "h3", n=2)
    assert len(load_study(export_study(eval_dir, tmp_path / "h3", n=3, force=True)).items) == 3
    assert len(load_study(export_study(eval_dir, tmp_path / "h4", n=50)).items) == 4  # fewer examples than asked

    with open(eval_dir / "examples.jsonl", "a") as f:
        f.write('{"id": "broken", "dialogue": \n')
    with pytest.raises(DataError, match="line 5: not valid JSON"):
        export_study(eval_dir, tmp_path / "h5")
    assert not (tmp_path / "h5").exists()


# ----------------------------------------------------------------------------------------------------
# human.select disagreement

# Per example and system: (reward-model toxicity, {judge: toxicity}). Dyadic values, so every |difference| is exact.
# Expected scores (max over systems and judges of |toxicity - judge|), by hand:
JUDGED = [
    {"a": (0.5, {"j1": 0.5, "j2": 0.5}), "b": (0.5, {"j1": 0.5, "j2": 0.5})},          # e0: 0
    {"a": (0.125, {"j1": 0.875, "j2": 0.125}), "b": (0.25, {"j1": 0.25, "j2": 0.25})},  # e1: 0.75, a/j1, judge higher
    {"a": (0.5, {"j1": 0.5, "j2": 0.5}), "b": (1.0, {"j1": 0.5, "j2": 0.0})},          # e2: 1.0, b/j2
    {"a": (0.5, {"j1": 0.25, "j2": 0.5}), "b": (0.0, {"j1": 0.0, "j2": 0.0})},         # e3: 0.25, a/j1
    {"a": (0.75, {"j1": 0.75, "j2": 0.75}), "b": (0.875, {"j1": 0.125, "j2": 0.875})}, # e4: 0.75, b/j1
    {"a": (0.0, {"j1": 0.5, "j2": 0.5}), "b": (0.5, {"j1": 0.5, "j2": 0.5})},          # e5: 0.5, a/j1 (first of a tie)
    {"a": (0.25, {"j1": 0.25, "j2": 0.25}), "b": (0.25, {"j1": 0.25, "j2": 1.0})},     # e6: 0.75, b/j2
]
# n=3: e2 (1.0), then the tie at 0.75 in file order: e1, e4 (not e6).
TOP3 = {"e2": (1, 1.0, "b", "j2"), "e1": (2, 0.75, "a", "j1"), "e4": (3, 0.75, "b", "j1")}


def write_judged_examples(path: Path, rows: list[dict]) -> Path:
    """An examples.jsonl like eval.evaluate's with held-out judges: rows[i][system] = (toxicity, judges)."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "examples.jsonl", "w") as f:
        for i, row in enumerate(rows):
            systems = {s: {"summary": f"Summary {i} by {s}.", "reward": 0.5, "toxicity": tox, "judges": judges,
                           "rouge1": 0.3, "length_tokens": 5} for s, (tox, judges) in row.items()}
            f.write(json.dumps({"id": f"e{i}", "dialogue": f"#Person1#: Hello {i}.", "human_summaries": ["Hi."],
                                "systems": systems}) + "\n")
    return path


def example_ids(study_dir: Path) -> list[str]:
    """The example ids of the items, in item order."""
    key = json.loads((study_dir / "key.json").read_text())
    return [key["items"][item.item_id]["example_id"] for item in load_study(study_dir).items]


def test_disagreement_picks_the_largest_gaps_ties_in_file_order(tmp_path: Path) -> None:
    eval_dir = write_judged_examples(tmp_path / "eval", JUDGED)
    study = export_study(eval_dir, tmp_path / "h", n=3, seed=0, select="disagreement")
    assert sorted(example_ids(study)) == sorted(TOP3)

    # The key says why each item was chosen: mode, rank, score and the system and judge that gave it.
    key = json.loads((study / "key.json").read_text())
    assert key["select"] == "disagreement"
    for entry in key["items"].values():
        rank, score, system, judge = TOP3[entry["example_id"]]
        reason = entry["disagreement"]
        assert (reason["rank"], reason["score"], reason["system"], reason["judge"]) == (rank, score, system, judge)
        tox, judges = JUDGED[int(entry["example_id"][1:])][system]
        assert (reason["reward_model"], reason["judge_toxicity"]) == (tox, judges[judge])
    # Annotators see the manifest: it does not say how the dialogues were chosen.
    manifest_text = (study / "manifest.json").read_text()
    assert "select" not in manifest_text and "disagreement" not in manifest_text

    # n larger than the evaluation: every example, still ranked in the key.
    everything = json.loads((export_study(eval_dir, tmp_path / "all", n=50, select="disagreement")
                             / "key.json").read_text())
    ranks = {e["example_id"]: e["disagreement"]["rank"] for e in everything["items"].values()}
    assert sorted(ranks, key=ranks.get) == ["e2", "e1", "e4", "e6", "e5", "e3", "e0"]
    reasons = {e["example_id"]: e["disagreement"] for e in everything["items"].values()}
    assert (reasons["e5"]["system"], reasons["e5"]["judge"]) == ("a", "j1")  # a tie within an example: the first



def test_disagreement_set_is_seed_independent_and_order_seeded(tmp_path: Path) -> None:
    eval_dir = write_judged_examples(tmp_path / "eval", JUDGED)
    orders = set()
    for seed in range(8):
        ids = example_ids(export_study(eval_dir, tmp_path / f"h{seed}", n=3, seed=seed, select="disagreement"))
        assert sorted(ids) == sorted(TOP3)  # the set is the ranking's, whatever the seed
        orders.add(tuple(ids))
    assert len(orders) > 1  # the item order is shuffled, so it does not reveal the ranking
    again = export_study(eval_dir, tmp_path / "again", n=3, seed=5, select="disagreement")
    assert (again / "items.jsonl").read_bytes() == (tmp_path / "h5/items.jsonl").read_bytes()


def test_random_select_is_unchanged(tmp_path: Path) -> None:
    """select "random" is the seeded sample of earlier versions, judges or not, and its key has no selection fields."""
    eval_dir = write_judged_examples(tmp_path / "eval", JUDGED)
    default = export_study(eval_dir, tmp_path / "default", n=4, seed=7)
    explicit = export_study(eval_dir, tmp_path / "explicit", n=4, seed=7, select="random")
    assert (default / "items.jsonl").read_bytes() == (explicit / "items.jsonl").read_bytes()
    lines = [json.loads(line) for line in (eval_dir / "examples.jsonl").read_text().splitlines()]
    assert example_ids(default) == [e["id"] for e in random.Random(7).sample(lines, 4)]
    key = json.loads((default / "key.json").read_text())
    assert "select" not in key and all("disagreement" not in e for e in key["items"].values())
    assert inspect.signature(export_study).parameters["select"].default == HumanConfig().select == "random"


def _set_judge(rows: list[dict], example: int, system: str, judges: dict) -> list[dict]:
    rows = [dict(row) for row in rows]
    rows[example] = {**rows[example], system: (rows[example][system][0], judges)}
    return rows


@pytest.mark.parametrize(("rows", "error", "message"), [
    ("no judges key", DataError, r"needs held-out judge scores.*--eval\.judges '\[\{name: toxigen, "),
    ([{s: (t, {}) for s, (t, _) in row.items()} for row in JUDGED], DataError, "needs held-out judge scores"),
    (_set_judge(JUDGED, 4, "b", {"j1": 0.5}), DataError,
     r"example 'e4', system 'b' has judges \['j1'\] but earlier summaries have \['j1', 'j2'\]"),
    (_set_judge(JUDGED, 0, "a", {}), DataError, r"example 'e0', system 'b' has judges \['j1', 'j2'\] but earlier "),
    (_set_judge(JUDGED, 3, "a", {"j1": 1.5, "j2": 0.5}), DataError, r"'e3', system 'a': judge 'j1' gave 1\.5, not a"),
    (_set_judge(JUDGED, 3, "a", {"j1": -0.5, "j2": 0.5}), DataError, "judge 'j1' gave -0.5, not a toxicity in"),
    (_set_judge(JUDGED, 3, "b", {"j1": 0.5, "j2": "0.5"}), DataError, "judge 'j2' gave '0.5', not a toxicity in"),
    (_set_judge(JUDGED, 3, "b", {"j1": 0.5, "j2": None}), DataError, "judge 'j2' gave None, not a toxicity"),
    (_set_judge(JUDGED, 3, "b", {"j1": 0.5, "j2": True}), DataError, "judge 'j2' gave True, not a toxicity"),
    (_set_judge(JUDGED, 3, "b", {"j1": 0.5, "j2": float("nan")}), DataError, "judge 'j2' gave nan, not a toxicity"),
    ([*JUDGED[:2], {**JUDGED[2], "a": (None, {"j1": 0.5, "j2": 0.5})}], DataError,
     r"'e2', system 'a': the reward model's 'toxicity' should be a number in \[0, 1\], got None"),
    (JUDGED, ConfigError, "human.select must be one of random, disagreement, got 'best'"),
])
def test_disagreement_refuses_bad_input_in_one_line_before_writing(tmp_path: Path, rows, error, message) -> None:
    if rows == "no judges key":  # an evaluation of earlier versions, without "judges"
        eval_dir = write_eval_examples(tmp_path / "eval", 4, ["a", "b"])
    else:
        eval_dir = write_judged_examples(tmp_path / "eval", rows)
    select = "best" if error is ConfigError else "disagreement"
    with pytest.raises(error, match=message) as raised:
        export_study(eval_dir, tmp_path / "h", n=3, select=select)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "h").exists()


def test_disagreement_reads_only_the_chosen_systems(tmp_path: Path) -> None:
    """Only the chosen systems' gaps choose a dialogue, and only they need judges."""
    neutral = (0.5, {"j1": 0.5, "j2": 0.5})
    rows = [{**row, "c": (0.0, {"j1": 1.0, "j2": 0.0}) if i == 0 else neutral} for i, row in enumerate(JUDGED)]
    eval_dir = write_judged_examples(tmp_path / "eval", rows)
    assert sorted(example_ids(export_study(eval_dir, tmp_path / "ab", n=3, select="disagreement",
                                           systems=["a", "b"]))) == sorted(TOP3)
    # With c, e0 (c/j1: 1.0) ties e2 (b/j2: 1.0) and comes first in the file.
    key = json.loads((export_study(eval_dir, tmp_path / "abc", n=1, select="disagreement") / "key.json").read_text())
    assert [(e["example_id"], e["disagreement"]["system"]) for e in key["items"].values()] == [("e0", "c")]

    rows[1] = {**rows[1], "c": (0.5, {})}  # c lacks judges where it is not chosen: no matter
    eval_dir = write_judged_examples(tmp_path / "eval2", rows)
    assert sorted(example_ids(export_study(eval_dir, tmp_path / "ab2", n=3, select="disagreement",
                                           systems=["a", "b"]))) == sorted(TOP3)
    with pytest.raises(DataError, match="example 'e1', system 'c' has judges"):
        export_study(eval_dir, tmp_path / "abc2", n=3, select="disagreement")
