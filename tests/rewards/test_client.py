"""The HTTP client of the reward server (rewards/client.py): retries and their budget, validation of the answers,
batches split by the server's request limit; first against a fake transport, then against the real server."""

from __future__ import annotations

import json
import re
import signal
import socket
import time

import httpx
import pytest

from rewards.client import RewardClient, total_backoff_s
from rewards.config import RewardConfig
from rewards.errors import RewardError
from rewards.reward_fn import make_reward_fn
from helpers import RewardServerProcess, assert_same_scores, texts_for


def scoring_transport(handler_log: list, statuses: list[int], payload=None, server_limit: int = 256):
    """An httpx transport answering /score with the given statuses in turn, then 200 with one score per text; /health
    reports `server_limit` texts per request."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok", "max_texts_per_request": server_limit})
        texts = json.loads(request.content)["texts"]
        handler_log.append(texts)
        if statuses:
            status = statuses.pop(0)
            return httpx.Response(status, json={"detail": f"status {status} from the fake server"})
        body = payload(texts) if payload else {
            "rewards": [float(len(t)) for t in texts], "toxicity": [0.5] * len(texts),
            "logits": [[float(len(t)), 0.0] for t in texts],
        }
        # json.dumps (unlike httpx's json=) writes NaN, as a broken server might.
        return httpx.Response(200, content=json.dumps(body).encode(), headers={"content-type": "application/json"})

    return httpx.MockTransport(handler)


def test_client_defaults_are_the_reward_sections():
    # One default per setting: the client's timeout and retries default to reward.timeout_s and reward.max_retries.
    client = RewardClient("http://reward")
    assert (client._http.timeout.read, client.max_retries) == (RewardConfig().timeout_s, RewardConfig().max_retries)


def test_client_retries_5xx_and_503_then_succeeds():
    calls: list = []
    client = RewardClient("http://reward", max_retries=3, backoff_s=0.01, transport=scoring_transport(calls, [503, 500]))
    scores = client.score(["ab", "abcd"])
    assert scores.rewards.tolist() == [2.0, 4.0] and len(calls) == 3


def test_client_does_not_retry_4xx_and_shows_the_server_message():
    calls: list = []
    client = RewardClient("http://reward", max_retries=3, backoff_s=0.01, transport=scoring_transport(calls, [413]))
    with pytest.raises(RewardError, match="HTTP 413: status 413 from the fake server"):
        client.score(["x"])
    assert len(calls) == 1


def test_client_gives_up_after_its_retry_budget():
    calls: list = []
    client = RewardClient("http://reward", max_retries=2, backoff_s=0.05, transport=scoring_transport(calls, [503] * 5))
    started = time.monotonic()
    # A 503 without Retry-After is a failing server, not a busy one: counted, and the hint says where to look.
    with pytest.raises(RewardError, match=r"did not answer after 3 attempts \(HTTP 503.*\): the server failed: see its log$"):
        client.score(["x"])
    assert len(calls) == 3
    assert total_backoff_s(2, 0.05) <= time.monotonic() - started < total_backoff_s(2, 0.05) + 2.0


def test_client_rejects_answers_without_one_reward_per_text():
    short = lambda texts: {"rewards": [1.0] * (len(texts) - 1), "toxicity": [0.1] * len(texts), "logits": [[1.0, 0.0]] * len(texts)}
    client = RewardClient("http://reward", transport=scoring_transport([], [], short))
    with pytest.raises(RewardError, match="expected exactly one score per text"):
        client.score(["a", "b", "c"])
    nan = lambda texts: {"rewards": [float("nan")] * len(texts), "toxicity": [0.1] * len(texts), "logits": [[1.0, 0.0]] * len(texts)}
    with pytest.raises(RewardError, match="non-finite"):
        RewardClient("http://reward", transport=scoring_transport([], [], nan)).score(["a"])
    with pytest.raises(RewardError, match="malformed"):
        RewardClient("http://reward", transport=scoring_transport([], [], lambda t: {"scores": []})).score(["a"])
    with pytest.raises(RewardError, match="empty"):
        RewardClient("http://reward").score([])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("logits", float("nan"), r"non-finite value in logits \(nan for text 1\)"),
        ("logits", float("-inf"), r"non-finite value in logits \(-inf for text 1\)"),
        ("toxicity", 1.5, r"toxicity 1.5 for text 1: a toxicity is a probability in \[0, 1\]"),
        ("toxicity", -0.25, r"toxicity -0.25 for text 1"),
        ("toxicity", float("inf"), r"non-finite value in toxicity \(inf for text 1\)"),
        ("rewards", float("nan"), r"non-finite value in rewards \(nan for text 1\)"),
    ],
)
def test_client_rejects_broken_numbers_naming_the_server_and_the_value(field, value, message):
    def broken(texts):
        body = {"rewards": [1.0] * len(texts), "toxicity": [0.5] * len(texts), "logits": [[1.0, 0.0]] * len(texts)}
        if field == "logits":
            body["logits"][1] = [0.0, value]
        else:
            body[field][1] = value
        return body

    client = RewardClient("http://reward:8500", transport=scoring_transport([], [], broken))
    with pytest.raises(RewardError, match=r"^reward server at http://reward:8500 sent .*" + message):
        client.score(["a", "b", "c"])
    # The bounds themselves are valid.
    edges = lambda texts: {"rewards": [-1e30] * 2, "toxicity": [0.0, 1.0], "logits": [[-1e30, 1e30]] * 2}
    scores = RewardClient("http://reward", transport=scoring_transport([], [], edges)).score(["a", "b"])
    assert scores.toxicity.tolist() == [0.0, 1.0]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("127.0.0.1:8500", "it has no scheme"),
        ("localhost", "it has no scheme"),
        ("ftp://127.0.0.1:8500", "scheme 'ftp' is not supported"),
        ("http://127.0.0.1:99999", "port 99999 is not in 1..65535"),
        ("http://127.0.0.1:0", "port 0 is not in 1..65535"),
        ("http://127.0.0.1:port", "Invalid port"),
        ("http://", "names no host"),
        ("http:/127.0.0.1:8500", "names no host"),
        ("http://127.0.0.1:8500/?x=1", "no spaces, query or fragment"),
        (" http://127.0.0.1:8500", "no scheme"),
        ("", "is empty"),
        ("http://xn--zz.com", "Invalid A-label"),  # the host is decoded lazily: it was an IDNAError traceback
        ("http://%zz:8500", "'%zz' is not a host name"),
        ("http://a..b:8500", "'a..b' is not a host name"),
    ],
)
def test_client_refuses_a_malformed_url_at_once(url, message):
    started = time.monotonic()
    with pytest.raises(RewardError, match=f"^reward server URL {re.escape(repr(url))} is (malformed|empty)") as caught:
        RewardClient(url, max_retries=3, backoff_s=1.0)
    assert message in str(caught.value) and "running?" not in str(caught.value)
    assert time.monotonic() - started < 0.5  # no attempts, no backoff
    if url:  # an empty reward.url means no server: make_reward_fn scores in-process then
        # make_reward_fn builds the client at once, so a bad reward.url stops a run before its first step.
        with pytest.raises(RewardError, match="is malformed"):
            make_reward_fn(RewardConfig(url=url, max_retries=3))


def test_client_accepts_well_formed_urls():
    # An underscore is no DNS host name, but container names have them and resolve: allowed.
    for url in ("http://127.0.0.1:8500", "https://reward.internal/", "http://[::1]:8500", "http://host:8500/prefix",
                "http://reward_server:8500", "http://bücher.example:8500"):
        assert RewardClient(url).url == url.rstrip("/")


def test_client_waits_what_a_503_retry_after_asks():
    calls: list = []

    def busy_once(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok", "max_texts_per_request": 8})
        calls.append(time.monotonic())
        if len(calls) == 1:
            return httpx.Response(503, json={"detail": "busy"}, headers={"Retry-After": "1"})
        return httpx.Response(200, json={"rewards": [0.0], "toxicity": [0.0], "logits": [[0.0, 0.0]]})

    client = RewardClient("http://reward", max_retries=1, backoff_s=0.01, transport=httpx.MockTransport(busy_once))
    assert len(client.score(["x"])) == 1
    assert calls[1] - calls[0] >= 1.0  # the server's Retry-After, not the 10 ms backoff


def test_client_splits_large_batches_and_keeps_order():
    calls: list = []
    client = RewardClient("http://reward", max_texts_per_request=3, transport=scoring_transport(calls, []))
    texts = ["a" * n for n in range(1, 9)]
    assert client.score(texts).rewards.tolist() == [float(n) for n in range(1, 9)]
    assert [len(c) for c in calls] == [3, 3, 2]
    calls.clear()  # no cap: the server's limit, asked once
    client = RewardClient("http://reward", transport=scoring_transport(calls, [], server_limit=5))
    assert len(client.score(texts)) == 8 and len(client.score(texts[:6])) == 6
    assert [len(c) for c in calls] == [5, 3, 5, 1]
    client = RewardClient("http://reward", max_texts_per_request=9, transport=scoring_transport(calls, [], server_limit=4))
    assert client.max_texts_per_request == 4  # a cap never raises the server's limit
    old_server = httpx.MockTransport(lambda request: httpx.Response(200, json={"status": "ok"}))
    with pytest.raises(RewardError, match="does not report max_texts_per_request"):
        RewardClient("http://reward", transport=old_server).score(["a"])


def test_client_refuses_text_utf8_cannot_encode_before_sending():
    calls: list = []
    client = RewardClient("http://reward", transport=scoring_transport(calls, []))
    # A lone surrogate ("\ud800": legal JSON, legal str) made httpx raise UnicodeEncodeError with a traceback.
    with pytest.raises(RewardError, match=r"^text 1 is not valid Unicode: character 2 is a lone surrogate"):
        client.score(["fine", "ab\ud800cd"])
    assert calls == []


def test_a_name_that_does_not_resolve_is_not_retried():
    attempts: list = []

    def unresolvable(request: httpx.Request) -> httpx.Response:
        attempts.append(request.url.path)
        try:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        except socket.gaierror as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc

    client = RewardClient("http://exa_mple:8500", max_retries=3, backoff_s=1.0, transport=httpx.MockTransport(unresolvable))
    started = time.monotonic()
    with pytest.raises(RewardError, match=r"host 'exa_mple' does not resolve \(.*Name or service not known\): check "
                                          r"reward\.url$"):
        client.health()
    assert attempts == ["/health"] and time.monotonic() - started < 0.5


def test_the_final_hint_follows_the_last_failure():
    def timing_out(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    client = RewardClient("http://reward", max_retries=1, backoff_s=0.01, timeout_s=7, transport=httpx.MockTransport(timing_out))
    with pytest.raises(RewardError, match=r"after 2 attempts \(ReadTimeout: timed out\): no answer within "
                                          r"reward\.timeout_s = 7 s") as caught:
        client.health()
    assert "running?" not in str(caught.value)

    def busy(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"detail": "reward server is busy: full"}, headers={"Retry-After": "0.05"})

    client = RewardClient("http://reward", max_retries=1, backoff_s=0.01, busy_timeout_s=0.3, transport=httpx.MockTransport(busy))
    with pytest.raises(RewardError, match=r"was still busy after 0\.3 s \(HTTP 503: reward server is busy: full\): it "
                                          r"has more to score than it can") as caught:
        client.health()
    assert "running?" not in str(caught.value)


def test_busy_answers_do_not_use_up_the_retries():
    """40 trainers on one server: 503 + Retry-After means "come back", not "broken". With max_retries=0 the client
    still waits its turn (until busy_timeout_s), where it used to give up after max_retries + 1 busy answers."""
    calls: list = []

    def busy_five_times(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok", "max_texts_per_request": 8})
        calls.append(request.url.path)
        if len(calls) <= 5:
            return httpx.Response(503, json={"detail": "busy"}, headers={"Retry-After": "0.01"})
        return httpx.Response(200, json={"rewards": [0.0], "toxicity": [0.0], "logits": [[0.0, 0.0]]})

    client = RewardClient("http://reward", max_retries=0, transport=httpx.MockTransport(busy_five_times))
    assert len(client.score(["x"])) == 1 and len(calls) == 6


def answer(rewards="ok", toxicity="ok", logits="ok"):
    """A /score payload with the given fields replaced (for 2 texts)."""
    body = {"rewards": [1.0, 2.0], "toxicity": [0.25, 0.5], "logits": [[1.0, 0.0], [2.0, 0.0]]}
    for key, value in (("rewards", rewards), ("toxicity", toxicity), ("logits", logits)):
        if value != "ok":
            body[key] = value
    return body


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (answer(logits=[[], []]), r"logits rows of \[0\] numbers: expected the same number \(one per class, at least one\)"),
        (answer(logits=[[1.0, 0.0], [1.0]]), r"logits rows of \[1, 2\] numbers"),
        (answer(rewards=[True, 1.0]), r"True in rewards for text 0: not a number"),
        (answer(toxicity=[0.5, False]), r"False in toxicity for text 1: not a number"),
        (answer(logits=[[1.0, 0.0], [True, 0.0]]), r"True in logits for text 1: not a number"),
        (answer(rewards=["1.0", 1.0]), r"'1.0' in rewards for text 0: not a number"),
        (answer(logits=[[1.0, 0.0], None]), r"a list of 2 as logits for 2 texts"),
        # An integer beyond any float was an OverflowError traceback from torch.
        (answer(rewards=[10**400, 1.0]), r"non-finite value in rewards \(10000000000000000000\.\.\. \(401 characters\) for text 0\)"),
        (answer(logits=[[1e39, 0.0], [0.0, 0.0]]), r"non-finite value in logits \(1e\+39 for text 0\)"),  # beyond float32
        ([1, 2], r"malformed /score answer \(expected an object with rewards, toxicity and logits, got a list of 2\)"),
    ],
)
def test_client_refuses_answers_that_are_no_scores(payload, message):
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok", "max_texts_per_request": 8})
        return httpx.Response(200, content=json.dumps(payload).encode(), headers={"content-type": "application/json"})

    with pytest.raises(RewardError, match=r"^reward server at http://reward sent .*" + message):
        RewardClient("http://reward", transport=httpx.MockTransport(handler)).score(["a", "b"])


def test_an_answer_nested_too_deeply_is_one_error():
    deep = b'{"rewards": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=deep, headers={"content-type": "application/json"})

    with pytest.raises(RewardError, match="answered /health with something that is not JSON"):
        RewardClient("http://reward", transport=httpx.MockTransport(handler)).health()
    failing = lambda request: httpx.Response(500, content=deep)  # the detail of an error answer, too
    with pytest.raises(RewardError, match=r"after 1 attempts \(HTTP 500: \{\"rewards\": \[\[\["):
        RewardClient("http://reward", max_retries=0, transport=httpx.MockTransport(failing)).health()


def test_chunks_with_different_logit_widths_are_refused():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok", "max_texts_per_request": 2})
        texts = json.loads(request.content)["texts"]
        width = 2 if texts[0] == "a" else 3  # the server's classifier changed between two chunks
        return httpx.Response(200, json={"rewards": [0.0] * len(texts), "toxicity": [0.0] * len(texts),
                                         "logits": [[0.0] * width] * len(texts)})

    with pytest.raises(RewardError, match=r"sent logits of 3 classes for texts from 2 but 2 before"):
        RewardClient("http://reward", transport=httpx.MockTransport(handler)).score(["a", "b", "c"])


# ----------------------------------------------------------------------------------------------------
# Against the real server (`python -m rewards.server` on the tiny classifier)


def test_client_reports_the_server_message_for_4xx(server):
    with RewardClient(server.url, token="wrong") as client, pytest.raises(RewardError, match="HTTP 401: wrong bearer token"):
        client.score(["hi"])


def test_client_raises_after_its_retry_budget_when_the_server_dies(tiny_artifacts):
    proc = RewardServerProcess(tiny_artifacts.roberta, token=None)
    try:
        client = RewardClient(proc.url, max_retries=2, backoff_s=0.2, timeout_s=5)
        assert len(client.score(["still alive"])) == 1
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(timeout=10)
        started = time.monotonic()
        with pytest.raises(RewardError, match=r"did not answer after 3 attempts .*python -m rewards\.server` running"):
            client.score(["anyone there?"])
        elapsed = time.monotonic() - started
        assert total_backoff_s(2, 0.2) <= elapsed < total_backoff_s(2, 0.2) + 3.0
    finally:
        proc.stop()


def test_client_reads_the_servers_request_limit(tiny_artifacts, local_scorer, tmp_path):
    """The client splits by the limit the server reports in /health (read once), not by a constant of its own; the
    server's settings come from a training recipe whose other sections it ignores."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("output_dir: runs/x\nppo:\n  steps: 3\nreward_server:\n  max_texts_per_request: 3\n"
                      "  max_wait_ms: 0\n")
    proc = RewardServerProcess(tiny_artifacts.roberta, "--config", str(recipe), token=None)
    texts = [texts_for(w, 1)[0] for w in range(7)]
    try:
        assert httpx.get(f"{proc.url}/health", timeout=5).json()["max_texts_per_request"] == 3
        before = proc.stats()["requests"]
        with RewardClient(proc.url) as client:
            assert_same_scores(client.score(texts), local_scorer.score(texts))
            assert client.max_texts_per_request == 3
        assert proc.stats()["requests"] - before == 3  # 3 + 3 + 1
        before = proc.stats()["requests"]
        with RewardClient(proc.url, max_texts_per_request=2) as client:  # a cap may lower the server's limit
            assert len(client.score(texts)) == 7
        assert proc.stats()["requests"] - before == 4
    finally:
        proc.stop()
