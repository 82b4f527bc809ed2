"""Human evaluation (eval.human): export blinding, validation of its files, the web app's rules, statistics, report.

The browser-driven end-to-end test lives in tests/test_human_eval_browser.py; here the app runs in-process
through Starlette's TestClient.
"""

from __future__ import annotations

import csv
import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from eval.human.app import COOKIE, annotator_order, create_app
from eval.human.export import export_study
from eval.human.items import load_key, load_study
from eval.human.report import write_report
from eval.human.stats import fractional_ranks, head_to_head, krippendorff_alpha, mean_ranks, wilson_interval, win_rates
from eval.human.store import AnswerStore
from train.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]


def write_eval_examples(path: Path, n: int, systems: list[str]) -> Path:
    """A small examples.jsonl in eval.evaluate's format; each summary names its example and system."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "examples.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({
                "id": f"test_{i}",
                "dialogue": f"#Person1#: Hello number {i}.\n#Person2#: Hi, how are you?",
                "references": [f"Two people greet each other ({i})."],
                "systems": {s: {"summary": f"Summary {i} written by model {k}.", "reward": 0.5, "toxicity": 0.1,
                                "rouge1": 0.3, "rouge2": 0.1, "rougeL": 0.2, "rougeLsum": 0.2}
                            for k, s in enumerate(systems)},
            }) + "\n")
    return path


@pytest.fixture
def two_system_study(tmp_path: Path) -> Path:
    eval_dir = write_eval_examples(tmp_path / "eval", 8, ["base_model", "ppo_model"])
    return export_study(eval_dir, tmp_path / "human", n=5, seed=3)


@pytest.fixture
def three_system_study(tmp_path: Path) -> Path:
    eval_dir = write_eval_examples(tmp_path / "eval3", 6, ["base_model", "sft_model", "ppo_model"])
    return export_study(eval_dir, tmp_path / "human3", n=6, seed=1)


# ---------------------------------------------------------------- export


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


# ---------------------------------------------------------------- validation of the study files


def test_tampered_corrupt_or_mismatched_files_are_refused(tmp_path: Path, two_system_study: Path) -> None:
    items = two_system_study / "items.jsonl"
    original = items.read_text()

    items.write_text(original.replace("Summary", "Sumary", 1))  # one edited character
    with pytest.raises(DataError, match="does not match manifest.json.*edited or replaced"):
        load_study(two_system_study)

    # A corrupt line is named even when the manifest was "fixed" to match it.
    items.write_text(original + "{not json\n")
    manifest = json.loads((two_system_study / "manifest.json").read_text())
    import hashlib

    manifest["items_sha256"] = hashlib.sha256(items.read_bytes()).hexdigest()
    (two_system_study / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="line 6: not valid JSON"):
        load_study(two_system_study)

    (two_system_study / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest not found"):
        load_study(two_system_study)


def test_key_and_database_must_belong_to_the_items(tmp_path: Path, two_system_study: Path) -> None:
    other = export_study(tmp_path / "eval", tmp_path / "other", n=5, seed=99)
    study, other_study = load_study(two_system_study), load_study(other)
    assert load_key(two_system_study / "key.json", study)  # the right key loads
    with pytest.raises(DataError, match="belongs to a different items.jsonl"):
        load_key(other / "key.json", study)

    AnswerStore(tmp_path / "answers.sqlite", other_study.items_sha256)
    with pytest.raises(DataError, match="holds answers for a different items.jsonl"):
        AnswerStore(tmp_path / "answers.sqlite", study.items_sha256)
    (tmp_path / "junk.sqlite").write_text("this is not a database " * 100)
    with pytest.raises(DataError, match="not a usable SQLite answers database"):
        AnswerStore(tmp_path / "junk.sqlite", study.items_sha256)
    with pytest.raises(DataError, match="answers database not found"):
        write_report(two_system_study, db=tmp_path / "missing.sqlite")


# ---------------------------------------------------------------- statistics


def test_wilson_interval_matches_published_values() -> None:
    # 8 successes of 10: Wilson 95% interval [0.4902, 0.9433] (e.g. Newcombe 1998, Table I style examples).
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    # 0 of 10: lower bound exactly 0, upper bound z²/(n+z²).
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(1.959964**2 / (10 + 1.959964**2), abs=1e-6)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_krippendorff_alpha_on_published_and_hand_worked_data() -> None:
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": 4 observers, 12 units, missing values.
    observers = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    units = [[row[u] for row in observers if row[u] is not None] for u in range(12)]
    assert krippendorff_alpha(units, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(units, "ordinal") == pytest.approx(0.815, abs=5e-4)
    assert krippendorff_alpha(units, "interval") == pytest.approx(0.849, abs=5e-4)

    # By hand: units (1,1), (2,2), (1,2). Coincidences o11 = 2, o22 = 2, o12 = o21 = 1; n1 = n2 = 3, n = 6.
    # With two values every metric has one distance d12 (nominal 1, ordinal (3+3-(3+3)/2)² = 9):
    # alpha = 1 - (n-1) * 2 * d12 / (2 * n1 * n2 * d12) = 1 - 5 * 2 / 18 = 4/9.
    hand = [[1, 1], [2, 2], [1, 2]]
    assert krippendorff_alpha(hand, "nominal") == pytest.approx(4 / 9)
    assert krippendorff_alpha(hand, "ordinal") == pytest.approx(4 / 9)
    assert krippendorff_alpha([[1, 1], [2, 2], [3, 3]], "ordinal") == pytest.approx(1.0)
    assert krippendorff_alpha([[1, 1], [1, 1]]) is None  # no variation: undefined
    assert krippendorff_alpha([[1], [2]]) is None  # nothing pairable


def test_win_rates_mean_ranks_and_head_to_head_by_hand() -> None:
    judgements = [{"a": 1, "b": 2}, {"a": 1.5, "b": 1.5}, {"a": 2, "b": 1}, {"a": 1, "b": 2}]
    rates = win_rates(judgements, ["a", "b"])
    assert (rates["a"].wins, rates["a"].comparisons, rates["a"].rate) == (2.5, 4, 0.625)
    assert (rates["b"].wins, rates["b"].rate) == (1.5, 0.375)
    assert (rates["a"].ci_low, rates["a"].ci_high) == wilson_interval(2.5, 4)
    assert mean_ranks(judgements, ["a", "b"]) == {"a": 5.5 / 4, "b": 6.5 / 4}

    three = [{"a": 1, "b": 2, "c": 3}, {"a": 3, "b": 1, "c": 2}]
    rates = win_rates(three, ["a", "b", "c"])
    # a beats b, c in the first and loses both in the second; b: 1 + 2; c: 0 + 1 (beats a).
    assert [rates[s].wins for s in "abc"] == [2, 3, 1] and all(rates[s].comparisons == 4 for s in "abc")
    pairs = head_to_head(three, ["a", "b", "c"])
    assert pairs[("a", "b")].rate == 0.5 and pairs[("b", "c")].rate == 1.0 and pairs[("c", "b")].rate == 0.0


# ---------------------------------------------------------------- the web app (in-process)


def client_for(study_dir: Path, db: Path, token: str | None = None) -> TestClient:
    study = load_study(study_dir)
    return TestClient(create_app(study, AnswerStore(db, study.items_sha256), token), follow_redirects=False)


def sign_in(client: TestClient, name: str, token: str | None = None) -> None:
    data = {"name": name} | ({"token": token} if token else {})
    response = client.post("/signin", data=data)
    assert response.status_code == 303 and response.headers["location"] == "/next"


def next_item_id(client: TestClient) -> str | None:
    response = client.get("/next")
    if response.status_code == 200:
        assert "All done" in response.text
        return None
    assert response.status_code == 303
    return response.headers["location"].removeprefix("/item/")


def count_rows(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_sign_in_and_token(two_system_study: Path, tmp_path: Path) -> None:
    client = client_for(two_system_study, tmp_path / "a.sqlite", token="s3cret")
    assert client.get("/next").headers["location"] == "/signin"
    page = client.get("/signin")
    assert page.status_code == 200 and 'name="token"' in page.text and '<label for="name">' in page.text
    wrong = client.post("/signin", data={"name": "ann", "token": "guess"})
    assert wrong.status_code == 403 and "Wrong access token" in wrong.text and COOKIE not in wrong.cookies
    assert client.post("/signin", data={"name": "   ", "token": "s3cret"}).status_code == 400
    sign_in(client, "ann", "s3cret")
    cookie = client.cookies.get(COOKIE)
    assert cookie and count_rows(tmp_path / "a.sqlite", "sessions") == 1
    # HTTP-only, same-site cookie.
    raw = client.post("/signin", data={"name": "ann", "token": "s3cret"}).headers["set-cookie"].lower()
    assert "httponly" in raw and "samesite=lax" in raw
    # The session survives an app restart (a new app on the same database).
    restarted = client_for(two_system_study, tmp_path / "a.sqlite", token="s3cret")
    restarted.cookies.set(COOKIE, cookie)
    assert next_item_id(restarted) is not None
    restarted.post("/signout")
    assert restarted.get("/next").headers["location"] == "/signin"


def test_annotation_flow_duplicates_unknown_items_and_bad_forms(two_system_study: Path, tmp_path: Path) -> None:
    db = tmp_path / "answers.sqlite"
    client = client_for(two_system_study, db)
    study = load_study(two_system_study)
    sign_in(client, "ann")

    first = next_item_id(client)
    assert first == annotator_order(study, "ann")[0]
    page = client.get(f"/item/{first}")
    assert page.status_code == 200 and "Item 1 of 5" in page.text and study.get(first).summaries[0][1] in page.text

    # Incomplete form: 400, the error names what is missing, the choice made is kept, nothing stored.
    bad = client.post(f"/item/{first}", data={"better_readability": "A"})
    assert bad.status_code == 400 and "Coherence: choose the better summary" in bad.text
    assert 'name="better_readability" value="A" required checked>' in bad.text
    assert 'name="better_coherence" value="A" required>' in bad.text
    assert client.post(f"/item/{first}", data={"better_readability": "Z", "better_coherence": "A"}).status_code == 400
    bad_flag = client.post(f"/item/{first}", data={"better_readability": "A", "better_coherence": "A", "flag_A": "rude"})
    assert bad_flag.status_code == 400 and "unknown flag" in bad_flag.text
    assert count_rows(db, "submissions") == 0

    answer = {"better_readability": "A", "better_coherence": "tie", "flag_B": ["toxic", "unusable"]}
    ok = client.post(f"/item/{first}", data=answer)
    assert ok.status_code == 303 and ok.headers["location"] == "/next"
    # Resubmitting (double click / back button): refused with a clear message, stored once.
    again = client.post(f"/item/{first}", data=answer)
    assert again.status_code == 409 and "already answered item" in again.text and "first answer is kept" in again.text
    assert count_rows(db, "submissions") == 1 and count_rows(db, "ranks") == 4 and count_rows(db, "flags") == 2
    assert client.get(f"/item/{first}").status_code == 409  # an answered item is not shown again

    # Unknown item id: 404 naming it, nothing stored.
    missing = client.post("/item/item-999", data=answer)
    assert missing.status_code == 404 and "no item with id item-999" in missing.text
    assert client.get("/item/item-999").status_code == 404
    assert count_rows(db, "submissions") == 1

    # Submitting without a session stores nothing.
    stranger = client_for(two_system_study, db)
    assert stranger.post(f"/item/{annotator_order(study, 'ann')[1]}", data=answer).status_code == 401
    assert count_rows(db, "submissions") == 1

    # The rest, in the annotator's order, with progress; then done.
    seen = [first]
    while (item_id := next_item_id(client)) is not None:
        assert f"Item {len(seen) + 1} of 5" in client.get(f"/item/{item_id}").text
        assert client.post(f"/item/{item_id}", data={"better_readability": "B", "better_coherence": "B"}).status_code == 303
        seen.append(item_id)
    assert seen == annotator_order(study, "ann")
    assert sorted(seen) == sorted(study.item_ids)

    stored = {a.item_id: a for a in AnswerStore(db, study.items_sha256).answers()}
    assert stored[first].ranks == {"readability": {"A": 1.0, "B": 2.0}, "coherence": {"A": 1.5, "B": 1.5}}
    assert stored[first].flags == {"B": ("toxic", "unusable")} and stored[first].submitted_at


def test_three_systems_need_a_rank_each_and_ties_are_averaged(three_system_study: Path, tmp_path: Path) -> None:
    db = tmp_path / "answers.sqlite"
    client = client_for(three_system_study, db)
    sign_in(client, "bo")
    item_id = next_item_id(client)
    assert 'name="rank_readability_C"' in client.get(f"/item/{item_id}").text
    missing_rank = {"rank_readability_A": "1", "rank_readability_B": "1",
                    "rank_coherence_A": "2", "rank_coherence_B": "3", "rank_coherence_C": "4"}
    response = client.post(f"/item/{item_id}", data=missing_rank)
    assert response.status_code == 400
    assert "Readability: give every summary a rank from 1 (best) to 3" in response.text
    assert "Coherence: give every summary a rank" in response.text  # 4 is out of range for 3 summaries
    assert count_rows(db, "submissions") == 0
    with_a_tie = missing_rank | {"rank_readability_C": "3", "rank_coherence_C": "1"}
    assert client.post(f"/item/{item_id}", data=with_a_tie).status_code == 303
    (answer,) = AnswerStore(db, load_study(three_system_study).items_sha256).answers()
    assert answer.ranks["readability"] == {"A": 1.5, "B": 1.5, "C": 3.0}  # A and B share ranks 1 and 2
    assert answer.ranks["coherence"] == {"A": 2.0, "B": 3.0, "C": 1.0}


def test_fractional_ranks_average_ties():
    assert fractional_ranks({"A": 1, "B": 2, "C": 3}) == {"A": 1.0, "B": 2.0, "C": 3.0}
    assert fractional_ranks({"A": 2, "B": 1, "C": 2}) == {"B": 1.0, "A": 2.5, "C": 2.5}
    assert fractional_ranks({"A": 1, "B": 1, "C": 1, "D": 4}) == {"A": 2.0, "B": 2.0, "C": 2.0, "D": 4.0}


# ---------------------------------------------------------------- report


def test_report_unblinds_and_matches_hand_computation(three_system_study: Path, tmp_path: Path) -> None:
    db = tmp_path / "answers.sqlite"
    study = load_study(three_system_study)
    slots_of = json.loads((three_system_study / "key.json").read_text())["items"]
    # Two annotators rank the same two items; both always put ppo first, then sft, then base, on readability;
    # on coherence "ann" puts base first on item 1. "bo" flags base as toxic on item 1.
    preference = {"ppo_model": 1, "sft_model": 2, "base_model": 3}
    items = study.item_ids[:2]
    for name in ("ann", "bo"):
        client = client_for(three_system_study, db)
        sign_in(client, name)
        for item_id in items:
            system_of = slots_of[item_id]["slots"]
            form = {f"rank_readability_{s}": str(preference[system_of[s]]) for s in "ABC"}
            coherence = dict(preference)
            if name == "ann" and item_id == items[0]:
                coherence = {"base_model": 1, "ppo_model": 2, "sft_model": 3}
            form |= {f"rank_coherence_{s}": str(coherence[system_of[s]]) for s in "ABC"}
            if name == "bo" and item_id == items[0]:
                form["flag_" + next(s for s in "ABC" if system_of[s] == "base_model")] = "toxic"
            assert client.post(f"/item/{item_id}", data=form).status_code == 303

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


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "eval.human", "export", "--human.eval_dir", str(tmp_path / "none"),
         "--human.study_dir", str(tmp_path / "h")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: evaluation examples not found")
    assert "Traceback" not in result.stderr
    former = subprocess.run([sys.executable, "-m", "eval.human", "export", "--out", str(tmp_path / "h")],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert former.returncode == 2 and former.stderr.strip() == "error: --out was replaced: use --human.study_dir"


def test_cli_reads_the_human_section_from_a_recipe_and_overrides(tmp_path: Path) -> None:
    """The recipe of a run finds its evaluation: human.eval_dir/study_dir default to <output_dir>/eval and /human."""
    from eval.human.__main__ import main

    run = tmp_path / "run"
    write_eval_examples(run / "eval", 8, ["base_model", "sft_model", "ppo_model"])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {run}\nppo:\n  steps: 3\nhuman:\n  n: 3\n  seed: 2\n")
    main(["export", "--config", str(recipe), "--human.systems", "base_model,ppo_model"])
    study = load_study(run / "human")
    assert len(study.items) == 3 and len(study.items[0].summaries) == 2
    assert json.loads((run / "human/key.json").read_text())["seed"] == 2
    main(["export", "--force", "--config", str(recipe), "--human.n=5", "--human.study_dir", str(tmp_path / "other")])
    assert len(load_study(tmp_path / "other").items) == 5  # the command line wins over the recipe


@pytest.mark.parametrize(("argv", "message"), [
    (["report", "--out", "x"], "--out was replaced: use --human.report_dir"),
    (["serve", "--port", "8601"], "--port was replaced: use --human.port"),
    (["serve", "--items", "x"], "--items was replaced: use --human.study_dir"),
    (["export", "--n", "5"], "--n was replaced: use --human.n"),
    (["serve", "--human.port", "0"], "human.port must be between 1 and 65535, got 0"),
    (["export", "--human.n", "0"], "human.n must be at least 1, got 0"),
    (["export", "--human.sead", "5"], "did you mean '--human.seed'"),
])
def test_cli_bad_settings_stop_before_any_work(capsys, argv: list[str], message: str) -> None:
    from eval.human.__main__ import main
    from train.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
