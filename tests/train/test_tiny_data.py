"""The synthetic data's file (train/tiny_data.yaml) and its generator: checked templates, clear errors, shape."""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

import pytest
import yaml

from train import tiny_data
from train.cli import run_cli
from train.errors import DataError
from train.tiny_data import DATA_FILE, TinyDataError, draw_scenario, load_data
from train.tiny_models import builder_stamp, main

PLACEHOLDER = re.compile(r"\{([^{}|]*)(?:\|[^{}]*)?\}")

# sha256 of the files `write_synthetic_data(out, 42)` writes, recorded from the generator as it was before its
# templates moved into tiny_data.yaml (nine Python functions). Editing the data file on purpose changes them:
# update them in the same change; any other change to them means the generator's draws moved.
SEED_42_SHA256 = {
    "dialogsum/train.csv": "7e2a8a841997048eeb545db2ba2fe841931e8c0bbbaa600a1b2225413ebb5052",
    "dialogsum/validation.csv": "2d75c213e6c0b3634a62b0a8a320904f963a41ead9db696eb01c83d144c641a1",
    "dialogsum/test.csv": "60944a5aeb620f3c4bbc84448c4cf99e7c8092b6d20e24ceee2558224169340c",
    "toxicity/train.jsonl": "7a754a1ce8650c4a1f631b724dce36527b10b1868ccab8b79bdef7822bdf0292",
    "toxicity/test.jsonl": "90b75301415e1ca64e03a66d1a86b1264a740e3f2bc3e55477b72a6f2e8d761f",
}


def edited_copy(tmp_path: Path, old: str, new: str) -> Path:
    """The shipped data file with one exact piece of text replaced."""
    text = DATA_FILE.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"the test's anchor {old!r} is not unique in {DATA_FILE}"
    path = tmp_path / "tiny_data.yaml"
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------
# The shipped file


def test_shipped_file_has_the_documented_scenarios():
    data = load_data()
    names = [s.name for s in data.scenarios]
    assert names == ["shopping", "doctor", "interview", "restaurant", "travel", "neighbours", "renting", "weekend",
                     "hotel"]
    assert data.short.name == "borrowing" and data.short.opener is None
    for spec in (*data.scenarios, data.short):
        assert len(spec.summaries) == tiny_data.TEST_SUMMARIES, spec.name
    assert len(data.heated.toxic) == len(data.heated.neutral) == tiny_data.TEST_SUMMARIES
    assert tiny_data.INSULT_NOUNS == list(data.tables["insult_nouns"])  # tables are module constants too
    with pytest.raises(AttributeError):
        tiny_data.NO_SUCH_TABLE


def test_every_placeholder_of_the_shipped_file_names_a_slot_of_its_scenario():
    """Read independently of the module's checker: the names each scenario's slots (and records) define."""
    raw = yaml.safe_load(DATA_FILE.read_text(encoding="utf-8"))

    def defined(slots: dict) -> set[str]:
        names = set()
        for name, spec in slots.items():
            records = [c for c in spec.get("choice", []) if isinstance(c, dict)]
            names |= {f"{name}.{field}" for field in records[0]} if records else {name}
        return names

    scenarios = {**raw["scenarios"], **raw["short_scenario"]}
    for name, spec in scenarios.items():
        slots = defined(spec.get("slots", {}))
        lines = [text for turn in spec["turns"] for text in turn.values()] + list(spec.get("opener", {}).values())
        for text in lines:
            assert set(PLACEHOLDER.findall(text)) <= slots, (name, text)
        for text in spec["summaries"]:
            assert set(PLACEHOLDER.findall(text)) <= slots | {"A", "B"}, (name, text)
    heated = raw["heated"]
    for text in [t for turn in heated["turns"] for t in turn.values()] + heated["toxic"] + heated["neutral"]:
        assert set(PLACEHOLDER.findall(text)) <= defined(heated["slots"]) | {"X", "Y"}, text
    for text in [t for templates in raw["toxicity"].values() for t in templates]:
        assert set(PLACEHOLDER.findall(text)) <= {"adj", "noun", "X", "Y"}, text


def test_drawn_scenarios_leave_only_the_speakers_unfilled():
    data = load_data()
    rng = random.Random(0)
    for spec in (*data.scenarios, data.short):
        for _ in range(30):
            scenario = draw_scenario(rng, spec)
            assert not any("{" in text or "}" in text for _, text in scenario.turns), spec.name
            assert all(set(PLACEHOLDER.findall(s)) <= {"A", "B"} for s in scenario.summaries), spec.name


def test_splits_have_the_documented_sizes_and_no_placeholder_left():
    assert tiny_data.SPLIT_SIZES == {"train": 1000, "validation": 100, "test": 100}
    for split, size in tiny_data.SPLIT_SIZES.items():
        dialogues = tiny_data.make_split(split, 42)
        assert len(dialogues) == size
        rows = tiny_data.split_rows(split, dialogues, 42)
        assert len(rows) == size * (tiny_data.TEST_SUMMARIES if split == "test" else 1)
        assert not any(c in r["dialogue"] + r["summary"] for r in rows for c in "{}")
        assert {r["topic"] for r in rows} <= {s.topic for s in load_data().scenarios} | {"borrowing"}


def test_generated_files_match_the_recorded_fingerprint(tmp_path):
    tiny_data.write_synthetic_data(tmp_path, 42)
    got = {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in SEED_42_SHA256}
    assert got == SEED_42_SHA256


# ----------------------------------------------------------------------------------------------------
# A malformed file: one error naming the file, the place and the slot


@pytest.mark.parametrize("old, new, expected", [
    # an unknown slot, wherever a template is
    ('"It\'s {price} dollars."', '"It\'s {prise} dollars."', ["scenario 'shopping', turn 3", "{prise}"]),
    ('"{B} helps {A} buy', '"{B} helps {C} buy', ["scenario 'shopping', summary 3", "{C}"]),
    ('A: "Hi, I\'d like to book a flight to {city}."', 'A: "Hi, I\'d like to book a flight to {town}."',
     ["scenario 'travel', opener A", "{town}"]),
    ('"Hi, {name}. Can I borrow', '"Hi, {nome}. Can I borrow', ["scenario 'borrowing', turn 1", "{nome}"]),
    ("I will {nuisance.fix} from now on", "I will {nuisance.fixes} from now on",
     ["scenario 'neighbours', turn 5", "{nuisance.fixes}"]),
    ("the {nuisance.problem} is really", "the {nuisance} is really", ["scenario 'neighbours', turn 2", "{nuisance}"]),
    ('"{X} and {Y} quarrel."', '"{X} and {Z} quarrel."', ["heated, neutral 2", "{Z}"]),
    ('"Get lost, you {adj} {noun}."', '"Get lost, you {adjective} {noun}."', ["toxicity, insults 5", "{adjective}"]),
    # a value may only use the slots drawn before it
    ('"tells {X} to get lost"', '"tells {outburst} to get lost"',
     ["heated, slot 'comeback', field 'reply'", "{outburst}"]),
    # filters, braces
    ("{seat|capitalize}", "{seat|upper}", ["scenario 'travel', turn 4", "unknown filter |upper"]),
    ('"It\'s {price} dollars."', '"It\'s {price dollars."', ["scenario 'shopping', turn 3", "stray brace"]),
    # speakers are for summaries only, also through a slot whose value names one
    ('"Medium, please. How much is it?"', '"Medium, please, {B}."', ["scenario 'shopping', turn 2", "{B}", "speaker"]),
    ('"{comeback.line}, you', '"{comeback.reply}, you', ["heated, turn 2", "{comeback.reply}", "speaker"]),
    ('"{B} helps {A} buy', '"{B|capitalize} helps {A} buy', ["scenario 'shopping', summary 3", "speaker"]),
    # slots
    ("doctor: {table: surnames}", "doctor: {table: surname}", ["scenario 'doctor', slot 'doctor'", "'surname'"]),
    ("final: {percent_off: [price, discount]}", "final: {percent_off: [price, color]}",
     ["scenario 'shopping', slot 'final'", "percent_off"]),
    ("price: {min: 40, max: 200, step: 10}", "price: {min: 40, max: 200, stride: 10}",
     ["scenario 'shopping', slot 'price'", "unknown key 'stride'"]),
    ("      payment: {choice: [credit card, cash, check]}",
     "      payment: {choice: [credit card, cash, check]}\n      payment: {choice: [cash]}",
     ["not valid YAML", "duplicate key 'payment'"]),
    # shape
    ('      - "{B} helps {A} buy a {color} {item}. With the discount it costs {final} dollars."\n', "",
     ["scenario 'shopping', summary", f"expected {tiny_data.TEST_SUMMARIES} phrasings"]),
    ('      - A: "Medium, please. How much is it?"', '      - B: "Medium, please. How much is it?"',
     ["scenario 'shopping', turn 2", "B speaks twice in a row"]),
    ("    - Y: \"{comeback.line}", "    - X: \"{comeback.line}", ["heated, turn 2", "X speaks twice in a row"]),
    ("  borrowing:\n    topic: borrowing", "  borrowing:\n    topic: [borrowing]", ["scenario 'borrowing', topic"]),
])
def test_malformed_file_names_the_place_and_the_problem(tmp_path, old, new, expected):
    path = edited_copy(tmp_path, old, new)
    with pytest.raises(TinyDataError) as error:
        load_data(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for part in expected:
        assert part in message


def test_plain_yaml_scalars_stay_text(tmp_path):
    """YAML 1.1 reads 7:30 as 450 and yes as True; the data file reads both as the text written."""
    path = edited_copy(tmp_path, '"7:30", "8 o\'clock"', "7:30, yes, \"8 o'clock\"")
    times = load_data(path).tables["clock_times"]
    assert times[:3] == ("7:30", "yes", "8 o'clock")
    assert isinstance(load_data().scenarios[0].slots[2].bounds[0], int)  # plain digits are still integers


def test_a_malformed_file_stops_the_builder_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tiny_data, "DATA_FILE", edited_copy(tmp_path, "{color}?", "{colour}?"))
    out = tmp_path / "tiny"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "scenario 'shopping', opener A" in err and "{colour}" in err
    assert not out.exists() and not list(tmp_path.glob("tiny.tmp-*"))
    assert issubclass(TinyDataError, DataError)


def test_editing_the_data_file_changes_the_builder_stamp(tmp_path, monkeypatch):
    """The stamp decides when artifacts/tiny is rebuilt, so it must cover the data file, not only the code."""
    shipped = builder_stamp()
    copy = tmp_path / "tiny_data.yaml"
    copy.write_bytes(DATA_FILE.read_bytes())
    monkeypatch.setattr(tiny_data, "DATA_FILE", copy)
    assert builder_stamp() == shipped  # the contents count, not the path
    copy.write_text(DATA_FILE.read_text(encoding="utf-8").replace("Bangkok", "Lisbon"), encoding="utf-8")
    assert builder_stamp()["builder_sha256"] != shipped["builder_sha256"]
