"""eval/human/app.py in process, through Starlette's TestClient: sign-in and access token, the annotation flow with
its duplicate, unknown and bad submissions, and ranking three systems.

The browser-driven end-to-end test is tests/eval/human/test_app_in_browser.py.
"""

from __future__ import annotations

from pathlib import Path

from eval.human.app import COOKIE, annotator_order
from eval.human.items import load_study
from eval.human.store import AnswerStore
from helpers import client_for, count_rows, next_item_id, sign_in


def test_sign_in_checks_the_token_and_the_session_survives_a_restart(two_system_study: Path, tmp_path: Path) -> None:
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
