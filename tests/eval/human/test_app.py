"""eval/human/app.py in process, through Starlette's TestClient: sign-in and access token, the annotation flow with
its duplicate, unknown and bad submissions, and ranking three systems.

The browser-driven end-to-end test is tests/eval/human/test_app_in_browser.py.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from starlette.datastructures import Headers

from eval.human.app import (COOKIE, SESSION_IDLE_S, SESSION_MAX_S, SIGNIN_COOKIE, SIGNIN_FORM_TTL_S, annotator_order,
                            body_problem)
from eval.human.items import load_study
from eval.human.store import Answer, AnswerStore, DuplicateSubmission
from helpers import REPO_ROOT, count_rows, free_port, next_item_id, replaying_receive


def test_sign_in_checks_the_token_and_the_session_survives_a_restart(two_system_study: Path, tmp_path: Path,
                                                                     human_client) -> None:
    client = human_client(two_system_study, tmp_path / "a.sqlite", token="s3cret")
    assert client.get("/next").headers["location"] == "/signin"
    page = client.get("/signin")
    assert page.status_code == 200 and 'name="token"' in page.text and '<label for="name">' in page.text
    wrong = client.try_sign_in("ann", "guess")
    assert wrong.status_code == 403 and "Wrong access token" in wrong.text and COOKIE not in wrong.cookies
    assert client.try_sign_in("   ", "s3cret").status_code == 400
    client.sign_in("ann", "s3cret")
    cookie = client.cookies.get(COOKIE)
    assert cookie and count_rows(tmp_path / "a.sqlite", "sessions") == 1
    # HTTP-only, same-site cookie.
    raw = client.try_sign_in("ann", "s3cret").headers["set-cookie"].lower()
    assert "httponly" in raw and "samesite=lax" in raw
    # The session survives an app restart (a new app on the same database).
    restarted = human_client(two_system_study, tmp_path / "a.sqlite", token="s3cret")
    restarted.cookies.set(COOKIE, client.cookies.get(COOKIE))
    assert next_item_id(restarted) is not None
    restarted.csrf = restarted.form_csrf("/next")
    assert restarted.submit("/signout", {}).headers["location"] == "/signin"
    assert restarted.get("/next").headers["location"] == "/signin"


def test_annotation_flow_duplicates_unknown_items_and_bad_forms(two_system_study: Path, tmp_path: Path,
                                                               human_client) -> None:
    db = tmp_path / "answers.sqlite"
    client = human_client(two_system_study, db)
    study = load_study(two_system_study)
    client.sign_in("ann")

    first = next_item_id(client)
    assert first == annotator_order(study, "ann")[0]
    page = client.get(f"/item/{first}")
    assert page.status_code == 200 and "Item 1 of 5" in page.text and study.get(first).summaries[0][1] in page.text

    # Incomplete form: 400, the error names what is missing, the choice made is kept, nothing stored.
    bad = client.submit(f"/item/{first}", {"better_readability": "A"})
    assert bad.status_code == 400 and "Coherence: choose the better summary" in bad.text
    assert 'name="better_readability" value="A" required checked>' in bad.text
    assert 'name="better_coherence" value="A" required>' in bad.text
    assert client.submit(f"/item/{first}", {"better_readability": "Z", "better_coherence": "A"}).status_code == 400
    bad_flag = client.submit(f"/item/{first}", {"better_readability": "A", "better_coherence": "A", "flag_A": "rude"})
    assert bad_flag.status_code == 400 and "unknown flag" in bad_flag.text
    assert count_rows(db, "submissions") == 0

    answer = {"better_readability": "A", "better_coherence": "tie", "flag_B": ["toxic", "unusable"]}
    ok = client.submit(f"/item/{first}", answer)
    assert ok.status_code == 303 and ok.headers["location"] == "/next"
    # Resubmitting (double click / back button): refused with a clear message, stored once.
    again = client.submit(f"/item/{first}", answer)
    assert again.status_code == 409 and "already answered item" in again.text and "first answer is kept" in again.text
    assert count_rows(db, "submissions") == 1 and count_rows(db, "ranks") == 4 and count_rows(db, "flags") == 2
    assert client.get(f"/item/{first}").status_code == 409  # an answered item is not shown again

    # Unknown item id: 404 naming it, nothing stored.
    missing = client.submit("/item/item-999", answer)
    assert missing.status_code == 404 and "no item with id item-999" in missing.text
    assert client.get("/item/item-999").status_code == 404
    assert count_rows(db, "submissions") == 1

    # Submitting without a session stores nothing.
    stranger = human_client(two_system_study, db)
    assert stranger.submit(f"/item/{annotator_order(study, 'ann')[1]}", answer).status_code == 401
    assert count_rows(db, "submissions") == 1

    # The rest, in the annotator's order, with progress; then done.
    seen = [first]
    while (item_id := next_item_id(client)) is not None:
        assert f"Item {len(seen) + 1} of 5" in client.get(f"/item/{item_id}").text
        assert client.submit(f"/item/{item_id}", {"better_readability": "B", "better_coherence": "B"}).status_code == 303
        seen.append(item_id)
    assert seen == annotator_order(study, "ann")
    assert sorted(seen) == sorted(study.item_ids)

    stored = {a.item_id: a for a in AnswerStore(db, study.items_sha256).answers()}
    assert stored[first].ranks == {"readability": {"A": 1.0, "B": 2.0}, "coherence": {"A": 1.5, "B": 1.5}}
    assert stored[first].flags == {"B": ("toxic", "unusable")} and stored[first].submitted_at


def test_three_systems_need_a_rank_each_and_ties_are_averaged(three_system_study: Path, tmp_path: Path,
                                                              human_client) -> None:
    db = tmp_path / "answers.sqlite"
    client = human_client(three_system_study, db)
    client.sign_in("bo")
    item_id = next_item_id(client)
    assert 'name="rank_readability_C"' in client.get(f"/item/{item_id}").text
    missing_rank = {"rank_readability_A": "1", "rank_readability_B": "1",
                    "rank_coherence_A": "2", "rank_coherence_B": "3", "rank_coherence_C": "4"}
    response = client.submit(f"/item/{item_id}", missing_rank)
    assert response.status_code == 400
    assert "Readability: give every summary a rank from 1 (best) to 3" in response.text
    assert "Coherence: give every summary a rank" in response.text  # 4 is out of range for 3 summaries
    assert count_rows(db, "submissions") == 0
    with_a_tie = missing_rank | {"rank_readability_C": "3", "rank_coherence_C": "1"}
    assert client.submit(f"/item/{item_id}", with_a_tie).status_code == 303
    (answer,) = AnswerStore(db, load_study(three_system_study).items_sha256).answers()
    assert answer.ranks["readability"] == {"A": 1.5, "B": 1.5, "C": 3.0}  # A and B share ranks 1 and 2
    assert answer.ranks["coherence"] == {"A": 2.0, "B": 3.0, "C": 1.0}


# ----------------------------------------------------------------------------------------------------
# A hostile visitor: oversized bodies, forms from other sites, other annotators' names, stale sessions.


@pytest.fixture
def live_server(two_system_study: Path, tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen]]:
    """`python -m eval.human serve` (uvicorn, as in production) on a free port: (port, process)."""
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "eval.human", "serve", "--human.study_dir", str(two_system_study),
             "--human.db", str(tmp_path / "answers.sqlite"), "--human.port", str(port)],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        yield port, server
    finally:
        server.terminate()
        server.wait(timeout=15)


def read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection; fails when it is still silent after the socket's
    timeout (a server reading the whole declared body never answers)."""
    response = b""
    try:
        while chunk := sock.recv(65536):
            response += chunk
    except socket.timeout:
        pytest.fail(f"no complete answer within {sock.gettimeout()} s (got {response[:200]!r}): the server is "
                    f"waiting for the rest of the body")
    except ConnectionResetError:
        pass  # the server closed with the unread body still queued; what it sent before still arrived
    return response


def request_head(port: int, path: str, headers: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\n{headers}\r\n").encode()


def test_the_human_app_rejects_an_oversized_body_without_reading_it(live_server) -> None:
    """A 300 MB POST to /signin is answered 413 from its Content-Length while most of the body was never sent, the
    connection is closed under the sender, and the server's memory does not grow by what the sender pushed."""
    port, server = live_server
    rss_before = psutil.Process(server.pid).memory_info().rss
    declared, offered, chunk = 300_000_000, 64 * 2**20, b"a" * 2**20
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(request_head(port, "/signin", f"Content-Length: {declared}\r\n") + b"name=")
    sent = 0

    def push_body() -> None:
        nonlocal sent
        try:
            while sent < offered:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server closed the connection: the rest of the body is never read

    sender = threading.Thread(target=push_body, daemon=True)
    started = time.monotonic()
    sender.start()
    try:
        response = read_response(sock)
        answered_in = time.monotonic() - started
        sender.join(timeout=20)
    finally:
        sock.close()
    growth = psutil.Process(server.pid).memory_info().rss - rss_before
    assert response.startswith(b"HTTP/1.1 413 "), response[:300]
    assert b"the request body is too large (300000000 bytes; at most 65536)" in response
    assert b"connection: close" in response.lower()
    assert answered_in < 5 and not sender.is_alive()
    assert sent < offered // 2, f"the server kept reading: {sent} bytes of the body were accepted"
    assert growth < 16 * 2**20, f"the server grew by {growth / 2**20:.0f} MiB"
    # Still serving.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as ok:
        assert ok.status == 200


@pytest.mark.parametrize(("headers", "status", "text"), [
    ("Transfer-Encoding: chunked\r\n", 411, b"must come with a Content-Length (chunked bodies are not accepted)"),
    ("Content-Length: lots\r\n", 400, b""),  # uvicorn's HTTP parser refuses it before the app sees it
    ("Content-Length: 65537\r\n", 413, b"the request body is too large (65537 bytes; at most 65536)"),
])
def test_bodies_without_a_usable_length_are_refused_from_the_headers(live_server, headers: str, status: int,
                                                                      text: bytes) -> None:
    port, _ = live_server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request_head(port, "/item/item-000", headers))  # the head only: no body follows
        response = read_response(sock)
    assert response.startswith(f"HTTP/1.1 {status} ".encode()) and text in response, response[:300]
    assert b"Traceback" not in response


def test_body_limits_hold_behind_any_server() -> None:
    """What the guard decides from the headers, for servers whose parser lets odd lengths through."""
    assert body_problem(Headers({"content-length": "lots"}), 10) == (400, "Content-Length must be a number of "
                                                                          "bytes, got 'lots'")
    assert body_problem(Headers({"content-length": "-1"}), 10)[0] == 400
    assert body_problem(Headers({"content-length": "\xb2"}), 10)[0] == 400  # "²": a digit to str.isdigit
    assert body_problem(Headers({"content-length": "11"}), 10)[0] == 413
    assert body_problem(Headers({"transfer-encoding": "chunked"}), 10)[0] == 411
    assert body_problem(Headers({"content-length": "10"}), 10) is None and body_problem(Headers({}), 10) is None
    # Transfer-Encoding wins over a Content-Length sent with it: "0" would not bound what is streamed.
    assert body_problem(Headers({"content-length": "0", "transfer-encoding": "chunked"}), 10)[0] == 411


def form_request(parts: list, length: int):
    """A POST /signin whose body arrives as `parts` ("stall": nothing more ever comes, "gone": the client hangs up)."""
    from starlette.requests import Request


    receive = replaying_receive(parts)

    scope = {"type": "http", "method": "POST", "path": "/signin", "query_string": b"", "root_path": "",
             "headers": [(b"content-length", str(length).encode())], "scheme": "http", "server": ("test", 80)}
    return Request(scope, receive)


def test_a_form_is_read_up_to_its_length_within_a_deadline(monkeypatch, caplog) -> None:
    """Reading stops at the declared length (it went on to 64 KiB), a stalled upload is refused after
    FORM_DEADLINE_S (it held its connection forever), and a client that hangs up mid-form is one log line, where
    ClientDisconnect escaped as "Exception in ASGI application" and a traceback."""
    from eval.human import app as human_app

    assert asyncio.run(human_app.read_form(form_request([b"name=", b"ann"], 8))) == {"name": ["ann"]}
    with pytest.raises(human_app.FormError, match="The form is too large"):
        asyncio.run(human_app.read_form(form_request([b"name=", b"ann&more=1"], 8)))
    monkeypatch.setattr(human_app, "FORM_DEADLINE_S", 0.2)
    started = time.monotonic()
    with pytest.raises(human_app.FormError, match=r"did not arrive within 0\.2 s \(5 of 8 bytes came\)"):
        asyncio.run(asyncio.wait_for(human_app.read_form(form_request([b"name=", "stall"], 8)), 5))
    assert time.monotonic() - started < 2
    with caplog.at_level("WARNING"), pytest.raises(human_app.FormError, match="connection closed"):
        asyncio.run(human_app.read_form(form_request([b"name=", "gone"], 8)))
    assert [r.getMessage() for r in caplog.records] == [
        "POST /signin: the client closed the connection before sending its whole body"]
    assert caplog.records[0].exc_info is None


ANSWER = {"better_readability": "A", "better_coherence": "tie"}


@pytest.mark.parametrize(("header", "value"), [
    ("origin", "http://127.0.0.1:9999"),  # another port of the same host: SameSite=Lax still sends the cookie
    ("origin", "null"),  # a sandboxed frame or a data: page
    ("origin", "https://testserver"),  # another scheme
    ("referer", "http://evil.example/page.html"),  # an older browser without Origin
])
def test_posts_from_another_origin_are_refused(two_system_study: Path, tmp_path: Path, human_client, header: str,
                                               value: str) -> None:
    db = tmp_path / "answers.sqlite"
    client = human_client(two_system_study, db)
    client.sign_in("ann")
    item_id = next_item_id(client)
    for path, data in ((f"/item/{item_id}", {"csrf": client.csrf, **ANSWER}), ("/signout", {"csrf": client.csrf}),
                       ("/signin", {"csrf": client.form_csrf("/signin", "/signin"), "name": "mallory"})):
        refused = client.post(path, data=data, headers={header: value})
        assert refused.status_code == 403, (path, refused.text)
        assert refused.text.count("\n") == 1 and "this form was sent from" in refused.text and "testserver" in refused.text
    assert count_rows(db, "submissions") == 0 and next_item_id(client) == item_id  # nothing stored, still signed in
    assert count_rows(db, "annotators") == 1
    # The same forms from the app's own origin (as a browser sends them) go through.
    own = {"origin": "http://testserver", "referer": "http://testserver/item/x"}[header]
    assert client.post(f"/item/{item_id}", data={"csrf": client.csrf, **ANSWER}, headers={header: own}).status_code == 303
    assert count_rows(db, "submissions") == 1


def test_every_form_needs_its_csrf_token(two_system_study: Path, tmp_path: Path, human_client) -> None:
    db = tmp_path / "answers.sqlite"
    ann, bo = human_client(two_system_study, db), human_client(two_system_study, db)
    ann.sign_in("ann")
    bo.sign_in("bo")
    item_id = next_item_id(ann)
    assert f'name="csrf" value="{ann.csrf}"' in ann.get(f"/item/{item_id}").text
    # An answer without the token, with a wrong one, or with another session's: 403, nothing stored.
    for data in (ANSWER, {**ANSWER, "csrf": "guess"}, {**ANSWER, "csrf": bo.csrf}, {**ANSWER, "csrf": [ann.csrf] * 2}):
        refused = ann.post(f"/item/{item_id}", data=data)
        assert refused.status_code == 403 and "out of date or sent from another site" in refused.text
    assert count_rows(db, "submissions") == 0
    # Sign-out needs it too (else any page could sign an annotator out).
    assert ann.post("/signout", data={}).status_code == 403 and next_item_id(ann) == item_id
    # Login CSRF: a sign-in form needs the token issued with this browser's pre-session cookie.
    mallory = human_client(two_system_study, db)
    forged = {"name": "mallory", "csrf": bo.form_csrf("/signin", "/signin")}  # a token that belongs to another cookie
    for data in ({"name": "mallory"}, forged):
        refused = mallory.post("/signin", data=data)
        assert refused.status_code == 403 and "sign-in form was out of date" in refused.text
        assert COOKIE not in mallory.cookies
    mallory.cookies.set("detox_human_signin", "x" * 43)  # a planted pre-session cookie: its token is unknown
    assert mallory.post("/signin", data={**forged, "csrf": "0" * 64}).status_code == 403
    assert count_rows(db, "annotators") == 2  # ann and bo only
    assert ann.submit(f"/item/{item_id}", ANSWER).status_code == 303 and count_rows(db, "submissions") == 1
    assert ann.submit("/signout", {}).headers["location"] == "/signin"
    assert ann.get("/next").headers["location"] == "/signin"


def test_a_name_belongs_to_the_annotator_who_signed_in_first(two_system_study: Path, tmp_path: Path,
                                                             human_client) -> None:
    """A holder of the study token cannot sign in under a name someone else uses and answer as them; the owner can
    move to another browser with the personal code their pages show."""
    db = tmp_path / "answers.sqlite"
    carol = human_client(two_system_study, db, token="s3cret")
    carol.sign_in("Carol", "s3cret")
    first = next_item_id(carol)
    assert carol.submit(f"/item/{first}", ANSWER).status_code == 303
    code = re.search(r"Your personal code is <code>([A-Z0-9-]+)</code>", carol.get("/next", follow_redirects=True).text)
    assert code, "the personal code is shown to its annotator"

    mallory = human_client(two_system_study, db, token="s3cret")
    for name, guess in (("Carol", None), ("carol ", None), ("Carol", "AAAA-AAAA-AAAA")):
        refused = mallory.try_sign_in(name, "s3cret", guess)
        assert refused.status_code == 403 and COOKIE not in mallory.cookies
        assert "The name &#39;Carol&#39; belongs to an annotator already" in refused.text
    assert count_rows(db, "sessions") == 1

    # Carol on a second browser, with her code (typed in any case, with or without dashes): her session, her answers.
    laptop = human_client(two_system_study, db, token="s3cret")
    laptop.sign_in("CAROL", "s3cret", code.group(1).lower().replace("-", " "))
    assert "Signed in as <strong>Carol</strong>" in laptop.get("/next", follow_redirects=True).text
    assert laptop.get(f"/item/{first}").status_code == 409  # answered on the first browser
    laptop.sign_in("Carol", "s3cret")  # this browser now keeps the code
    # The first browser too, until Carol signs out there (test_a_shared_browser_remembers_only_its_current_...).
    carol.sign_in("carol", "s3cret")


def test_sessions_end_when_idle_and_after_their_lifetime(two_system_study: Path, tmp_path: Path, human_client,
                                                         clock) -> None:
    db = tmp_path / "answers.sqlite"
    client = human_client(two_system_study, db, clock=clock)
    client.sign_in("ann")
    item_id = next_item_id(client)
    clock.now += SESSION_IDLE_S - 60
    assert next_item_id(client) == item_id  # used within the idle limit: still signed in, and the use counts
    clock.now += SESSION_IDLE_S - 60
    assert next_item_id(client) == item_id
    clock.now += SESSION_IDLE_S + 1
    expired = client.get("/next")
    assert expired.status_code == 303 and expired.headers["location"] == "/signin?expired=1"
    assert "Your session has ended (12 hours without activity" in client.get("/signin?expired=1").text
    assert client.submit(f"/item/{item_id}", ANSWER).status_code == 401
    assert count_rows(db, "submissions") == 0 and count_rows(db, "sessions") == 0

    # However busy, a session ends SESSION_MAX_S after its sign-in.
    client.sign_in("ann")
    signed_in_at = clock.now
    while clock.now - signed_in_at <= SESSION_MAX_S:
        assert next_item_id(client) == item_id
        clock.now += 6 * 3600
    late = client.submit(f"/item/{item_id}", ANSWER)
    assert late.status_code == 401 and "Your session has expired, so this answer was not stored" in late.text
    assert count_rows(db, "submissions") == 0
    # Sign-in forgets expired sessions of others.
    client.sign_in("ann")
    assert count_rows(db, "sessions") == 1


def test_names_are_one_annotator_however_they_are_spelled(two_system_study: Path, tmp_path: Path,
                                                          human_client) -> None:
    db = tmp_path / "answers.sqlite"
    study = load_study(two_system_study)
    client = human_client(two_system_study, db)
    client.sign_in("Carol")
    first = next_item_id(client)
    assert client.submit(f"/item/{first}", ANSWER).status_code == 303
    for spelling in ("carol", "  CAROL ", "Ｃａｒｏｌ"):  # the last: full-width letters, one name under NFKC
        client.sign_in(spelling)
        page = client.get("/next", follow_redirects=True).text
        assert "Signed in as <strong>Carol</strong>" in page and "Item 2 of 5" in page
        assert client.get(f"/item/{first}").status_code == 409
    assert next_item_id(client) == annotator_order(study, "Carol")[1]
    # Even a direct store write under another spelling is a duplicate.
    store = AnswerStore(db, study.items_sha256)
    with pytest.raises(DuplicateSubmission):
        store.submit(Answer("CAROL", first, {"readability": {"A": 1.0, "B": 2.0}}))
    assert count_rows(db, "annotators") == 1 and count_rows(db, "submissions") == 1
    assert [a.annotator for a in store.answers()] == ["Carol"]


def personal_code(client) -> str:
    page = client.get("/next", follow_redirects=True).text
    found = re.search(r"Your personal code is <code>([A-Z0-9-]+)</code>", page)
    assert found, "the personal code is shown to its annotator"
    return found.group(1)


def test_a_shared_browser_remembers_only_its_current_annotators_code(two_system_study: Path, tmp_path: Path,
                                                                     human_client) -> None:
    """On one browser "Alice" then "Bob" sign in: nobody can then sign in there as Alice without typing her code,
    and once Bob signs out, not as Bob either. Pages that show a code are never kept in the browser's cache."""
    db = tmp_path / "answers.sqlite"
    browser = human_client(two_system_study, db, token="s3cret")
    browser.sign_in("Alice", "s3cret")
    alice_code = personal_code(browser)
    browser.submit("/signout", {})
    browser.sign_in("Bob", "s3cret")
    for name in ("alice", "Alice"):
        refused = browser.try_sign_in(name, "s3cret")
        assert refused.status_code == 403 and "belongs to an annotator" in refused.text
    assert "Signed in as <strong>Bob</strong>" in browser.get("/next", follow_redirects=True).text  # still Bob
    # Bob signed in again without signing out (a session that ended, say) needs nothing typed...
    browser.sign_in("bob", "s3cret")
    # ...but after signing out, this browser has forgotten his code too.
    browser.submit("/signout", {})
    assert browser.try_sign_in("bob", "s3cret").status_code == 403
    # Typed codes are how annotators switch.
    browser.sign_in("ALICE", "s3cret", alice_code)
    assert personal_code(browser) == alice_code
    assert browser.try_sign_in("Bob", "s3cret").status_code == 403  # Alice's sign-in did not bring Bob's code back

    # Sign-in and signed-in pages are not stored, so Back after signing out cannot show a code.
    item_id = next_item_id(browser)
    for path in ("/signin", "/next", f"/item/{item_id}", "/item/item-999"):
        page = browser.get(path, follow_redirects=True)
        assert page.headers.get("cache-control") == "no-store", (path, page.headers)
    refused = browser.try_sign_in("Bob", "s3cret")  # the sign-in page sent back, with the name typed in
    assert refused.status_code == 403 and refused.headers.get("cache-control") == "no-store"


def test_the_sign_in_form_token_is_issued_by_the_server_used_once_and_expires(two_system_study: Path,
                                                                              tmp_path: Path, human_client,
                                                                              clock) -> None:
    db = tmp_path / "answers.sqlite"
    # A pre-session cookie the caller chose is not signed for: the form it gets back does not sign in with it.
    mallory = human_client(two_system_study, db, clock=clock)
    for chosen in ("x" * 43, f"{int(clock.now)}.{'x' * 43}.{'0' * 64}"):
        mallory.cookies.set(SIGNIN_COOKIE, chosen)
        token = mallory.form_csrf("/signin", "/signin")
        mallory.cookies.clear()  # whatever cookie came back: send the chosen one only
        mallory.cookies.set(SIGNIN_COOKIE, chosen)
        refused = mallory.post("/signin", data={"csrf": token, "name": "mallory"})
        assert refused.status_code == 403 and "sign-in form was out of date" in refused.text
        mallory.cookies.clear()
    # A form of the server's works once: replaying it with its cookie does not sign in again.
    ann = human_client(two_system_study, db, clock=clock)
    token = ann.form_csrf("/signin", "/signin")
    issued = ann.cookies.get(SIGNIN_COOKIE)
    assert issued and issued != chosen
    assert ann.post("/signin", data={"csrf": token, "name": "ann"}).status_code == 303
    replay = human_client(two_system_study, db, clock=clock)
    replay.cookies.set(SIGNIN_COOKIE, issued)
    again = replay.post("/signin", data={"csrf": token, "name": "someone"})
    assert again.status_code == 403 and "sign-in form was out of date" in again.text and COOKIE not in replay.cookies
    # A sign-in form left open too long is out of date; the page sent back has a fresh one that works.
    bo = human_client(two_system_study, db, clock=clock)
    token = bo.form_csrf("/signin", "/signin")
    clock.now += SIGNIN_FORM_TTL_S + 1
    late = bo.post("/signin", data={"csrf": token, "name": "bo"})
    assert late.status_code == 403 and "sign-in form was out of date" in late.text and 'value="bo"' in late.text
    bo.sign_in("bo")
    assert count_rows(db, "annotators") == 2  # ann and bo


@pytest.mark.parametrize(("name", "why"), [
    ("Carol\u3164", "HANGUL FILLER"),  # printable, and shows as nothing
    ("\u3164", "HANGUL FILLER"),
    ("Bob\u2800", "BRAILLE PATTERN BLANK"),
    ("Ca\u034frol", "COMBINING GRAPHEME JOINER"),
    ("Carol\ufe0f", "VARIATION SELECTOR-16"),
    ("Car\u00adol", "SOFT HYPHEN"),
    ("Car\u200bol", "ZERO WIDTH SPACE"),
    ("C\u0430rol", "Cyrillic and Latin"),  # a Cyrillic "а" among Latin letters
    ("\u0392ob", "Greek and Latin"),  # a Greek capital beta
])
def test_invisible_characters_and_mixed_scripts_are_refused_in_names(two_system_study: Path, tmp_path: Path,
                                                                     human_client, name: str, why: str) -> None:
    db = tmp_path / "answers.sqlite"
    client = human_client(two_system_study, db)
    client.sign_in("Carol")
    refused = human_client(two_system_study, db).try_sign_in(name)
    assert refused.status_code == 400 and why in refused.text, refused.text[-1500:]
    assert count_rows(db, "annotators") == 1


def test_names_in_one_script_of_any_kind_are_welcome(two_system_study: Path, tmp_path: Path, human_client) -> None:
    db = tmp_path / "answers.sqlite"
    for name in ("José Ñúñez", "O'Brien-Smith 2", "Иван", "Σοφία", "山田たろう", "김철수", "محمد"):
        human_client(two_system_study, db).sign_in(name)
    assert count_rows(db, "annotators") == 7


class StoreOffTheEventLoop(AnswerStore):
    """Fails any database call made on the event loop's thread, where it would hold up every other request."""

    def _connect(self):  # type: ignore[override]
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return super()._connect()
        raise AssertionError("a blocking SQLite call ran on the event loop")


def test_no_database_call_runs_on_the_event_loop(two_system_study: Path, tmp_path: Path, human_client) -> None:
    client = human_client(two_system_study, tmp_path / "answers.sqlite", token="s3cret",
                          store_class=StoreOffTheEventLoop)
    client.sign_in("ann", "s3cret")
    item_id = next_item_id(client)
    assert client.get(f"/item/{item_id}").status_code == 200
    assert client.submit(f"/item/{item_id}", {"better_readability": "A"}).status_code == 400
    assert client.submit(f"/item/{item_id}", ANSWER).status_code == 303
    assert client.submit("/signout", {}).headers["location"] == "/signin"
    assert client.try_sign_in("ANN", "s3cret").status_code == 403
