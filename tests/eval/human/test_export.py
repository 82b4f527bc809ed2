"""eval/human/export.py: a study exported from eval.evaluate's examples is blinded, seeded and keyed; bad input
is refused."""

from __future__ import annotations

import csv
import inspect
import json
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
