"""The reward server (rewards/server.py) as a real subprocess (`python -m rewards.server`): same scores as in-process,
dynamic batching across concurrent clients, request validation, loopback binding, its settings, and the startup error
for a missing model. The batcher and its queue limit are checked in-process. The client's side is test_client.py."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import pytest
import torch

from rewards.client import RewardClient
from rewards.config import RewardConfig, RewardServerConfig
from rewards.errors import ConfigError
from rewards.scorer import RewardScores
from fastapi import HTTPException

from rewards.server import (
    BODIES_IN_MEMORY, DynamicBatcher, QueueFullError, WorkerStopped, build_app, max_body_bytes, parse_args,
    parse_texts, read_token, request_cost,
)
from helpers import (
    REPO_ROOT, REWARD_MAX_CHARS, REWARD_MAX_TEXTS, REWARD_TOKEN, RewardServerProcess, assert_same_scores, free_port,
    replaying_receive, texts_for,
)

AUTH = {"Authorization": f"Bearer {REWARD_TOKEN}"}
MAX_BODY = max_body_bytes(RewardServerConfig(max_texts_per_request=REWARD_MAX_TEXTS, max_chars=REWARD_MAX_CHARS))


def test_health_reports_model_labels_and_device(server, tiny_artifacts):
    health = httpx.get(f"{server.url}/health", headers=AUTH, timeout=5).json()
    assert health["status"] == "ok" and health["device"] == "cpu"
    assert health["model"] == str(tiny_artifacts.roberta)
    assert health["labels"] == {"0": "nothate", "1": "hate"}
    # The limits clients read to split their batches (rewards.client), and the texts per model call.
    assert (health["max_texts_per_request"], health["max_chars"], health["batch_size"]) == (
        REWARD_MAX_TEXTS, REWARD_MAX_CHARS, 32)
    assert health["stats"]["body_bytes_held"] == 0


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-the-token"}])
def test_stats_and_health_details_need_the_token(server, headers):
    response = httpx.get(f"{server.url}/stats", headers=headers, timeout=5)
    assert response.status_code == 401 and "bearer token" in response.json()["detail"]
    assert response.headers["www-authenticate"] == "Bearer"
    assert set(server.stats()) >= {"requests", "batches", "queued"}  # with the token
    # /health stays open for liveness checks and tells the limits, but not what runs nor its traffic.
    health = httpx.get(f"{server.url}/health", headers=headers, timeout=5)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "max_texts_per_request": REWARD_MAX_TEXTS, "max_chars": REWARD_MAX_CHARS,
                             "batch_size": 32}


def test_server_scores_equal_in_process_scores(server, local_scorer):
    texts = [texts_for(w, 0)[0] for w in range(8)] + ["", "x" * REWARD_MAX_CHARS]
    with RewardClient(server.url, token=REWARD_TOKEN) as client:
        remote = client.score(texts)
    assert_same_scores(remote, local_scorer.score(texts))
    assert remote.toxicity.max() > 0.5 > remote.toxicity.min()  # both classes present: a mix-up would show


def test_concurrent_clients_get_their_own_results_from_dynamic_batches(server, local_scorer):
    workers, requests_each = 8, 4
    before = server.stats()
    start = threading.Barrier(workers)
    results: dict[tuple[int, int], RewardScores] = {}
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            with RewardClient(server.url, token=REWARD_TOKEN) as client:
                start.wait(timeout=30)
                for request in range(requests_each):
                    results[worker, request] = client.score(texts_for(worker, request))
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and len(results) == workers * requests_each
    for (worker, request), scores in results.items():
        assert_same_scores(scores, local_scorer.score(texts_for(worker, request)))
    after = server.stats()
    served = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert served == workers * requests_each
    assert batches < served, f"{served} requests ran in {batches} batches: no dynamic batching happened"
    assert after["most_requests_in_a_batch"] > 1 and after["largest_batch"] <= 32


@pytest.mark.parametrize(
    ("content", "headers", "status", "message"),
    [
        (b'{"texts": ["unterminated', {}, 400, "not valid JSON"),
        (b'{"texts": ["\xff\xfe"]}', {}, 400, "not valid JSON"),
        # Deep nesting was a RecursionError in json's parser (a 500 with a traceback): now the first item is refused.
        (b'{"texts": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}, 422, '"texts" must hold only strings; item 0 is a list'),
        (b'{"texts": ' + b"[" * 5000, {}, 422, "item 0 is a list"),
        (b'{"texts": [' + b"{}," * 1000 + b"{}]}", {}, 422, "item 0 is an object"),
        (b'{"texts": ["hi"], "more": 1}', {}, 422, "with no other key"),
        # Legal JSON and a legal Python str, but no UTF-8: it made the tokenizer raise TypeError for the whole batch.
        (b'{"texts": ["ok", "ab\\ud800"]}', {}, 422, "text 1 is not valid Unicode: character 2 is a lone surrogate"),
        # Refused by its Content-Length before the body is read, with the limit in the message.
        (('{"texts": ["' + "y" * MAX_BODY + '"]}').encode(), {}, 413,
         f"bytes; at most {MAX_BODY}): split the batch (a request holds at most max_texts_per_request"),
        (b'["just", "a", "list"]', {}, 422, 'JSON object {"texts"'),
        (b'{"texts": "one string"}', {}, 422, "must be a list of strings"),
        (b'{"texts": ["ok", 7]}', {}, 422, "item 1 is a number"),
        (b'{"texts": []}', {}, 422, "empty"),
        (("{\"texts\": [" + ", ".join(['"x"'] * (REWARD_MAX_TEXTS + 1)) + "]}").encode(), {}, 413,
         f"limit is {REWARD_MAX_TEXTS}"),
        (('{"texts": ["' + "y" * (REWARD_MAX_CHARS + 1) + '"]}').encode(), {}, 413, f"limit is {REWARD_MAX_CHARS} per text"),
        (b'{"texts": ["hi"]}', {"Authorization": None}, 401, "missing bearer token"),
        (b'{"texts": ["hi"]}', {"Authorization": "Bearer not-the-token"}, 401, "wrong bearer token"),
        (b'{"texts": ["hi"]}', {"Authorization": "Basic abc"}, 401, "missing bearer token"),
    ],
)
def test_bad_requests_get_a_clear_4xx(server, content, headers, status, message):
    sent = {"Authorization": f"Bearer {REWARD_TOKEN}", "Content-Type": "application/json"}
    sent.update(headers)
    response = httpx.post(f"{server.url}/score", content=content, headers={k: v for k, v in sent.items() if v}, timeout=10)
    assert response.status_code == status
    detail = response.json()["detail"]
    assert message in detail and "\n" not in detail and "Traceback" not in detail
    assert server.stats()["body_bytes_held"] == 0  # every reservation is given back


def test_a_chunked_body_over_the_limit_is_stopped_while_read(server):
    # No Content-Length to check beforehand: reading stops at the limit.
    chunks = iter([b'{"texts": ["', *[b"z" * 4096] * (MAX_BODY // 4096 + 2), b'"]}'])
    response = httpx.post(f"{server.url}/score", content=chunks, timeout=10,
                          headers={"Authorization": f"Bearer {REWARD_TOKEN}", "Content-Type": "application/json"})
    assert response.status_code == 413 and response.headers["connection"] == "close"
    assert response.json()["detail"] == (f"the request body is longer than the limit ({MAX_BODY} bytes): split the "
                                         "batch (a request holds at most max_texts_per_request texts of max_chars "
                                         "characters)")
    assert server.stats()["body_bytes_held"] == 0


def memory_mib(pid: int) -> dict[str, float]:
    """The process's resident memory now (VmRSS) and at its highest so far (VmHWM), in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def test_concurrent_maximum_size_requests_stay_within_the_memory_budget(tiny_artifacts):
    """40 clients send a maximum-size body at once, of the shape that costs the most: every text max_chars characters
    beyond the Basic Multilingual Plane, escaped as json.dumps does (12 body bytes a character, so the body is as
    large as the limits allow, and 4 bytes a character once parsed, so the texts are as large as they can be). The
    server admits requests up to its budget (BODIES_IN_MEMORY requests' request_cost) and lets the others wait, their
    bodies unread, so its memory grows by about the budget, not with the number of requests; and what it grew by is
    given back. Before admission control the same burst took about 190 MiB at the peak, and kept 80 MiB."""
    settings = RewardServerConfig(max_texts_per_request=256, max_chars=2000)
    budget_mib = BODIES_IN_MEMORY * request_cost(max_body_bytes(settings), settings) / 2**20  # 16.0 MiB
    bound_mib = budget_mib + 32  # 32 MiB: tokenizer and allocator slack
    body = json.dumps({"texts": ["\U0001F600" * settings.max_chars] * settings.max_texts_per_request}).encode()
    assert 0.99 * max_body_bytes(settings) < len(body) <= max_body_bytes(settings)
    proc = RewardServerProcess(tiny_artifacts.roberta, "--reward.batch_size", "16",
                               "--reward_server.max_texts_per_request", str(settings.max_texts_per_request),
                               "--reward_server.max_chars", str(settings.max_chars), token=None)
    headers = {"Content-Type": "application/json"}
    try:
        # One request first, so the baseline holds the memory one scoring of a maximum-size request takes anyway.
        assert httpx.post(f"{proc.url}/score", content=body, headers=headers, timeout=60).status_code == 200
        before = memory_mib(proc.proc.pid)
        clients = 40
        start = threading.Barrier(clients)
        answers: list = []

        def send() -> None:
            with httpx.Client(timeout=60) as client:
                start.wait(timeout=30)
                try:
                    response = client.post(f"{proc.url}/score", content=body, headers=headers)
                    answers.append((response.status_code, response.headers.get("retry-after"), response.json()))
                except httpx.HTTPError as exc:  # a server that queued everything is still scoring when we give up
                    answers.append((type(exc).__name__, None, None))

        threads = [threading.Thread(target=send) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        time.sleep(0.5)
        after = memory_mib(proc.proc.pid)
        peak, kept = after["VmHWM"] - before["VmHWM"], after["VmRSS"] - before["VmRSS"]
        assert peak < bound_mib, f"peak memory grew by {peak:.0f} MiB, over {bound_mib:.0f} MiB: {before} -> {after}"
        assert kept < bound_mib, f"memory kept {kept:.0f} MiB after the burst, over {bound_mib:.0f} MiB"
        statuses = [status for status, _, _ in answers]
        # Those that did not fit waited for room (up to BUDGET_WAIT_S) instead of a 503 at once.
        assert len(answers) == clients and 200 in statuses and set(statuses) <= {200, 503}, statuses
        for status, retry_after, payload in answers:
            if status == 200:
                assert len(payload["rewards"]) == settings.max_texts_per_request
            else:
                assert retry_after == "1" and payload["detail"].startswith("reward server is busy: ")
        stats = proc.stats()
        assert stats["body_bytes_held"] == 0 and stats["waiting_for_room"] == 0
        assert stats["body_bytes_limit"] / 2 < stats["body_bytes_peak"] <= stats["body_bytes_limit"], stats
    finally:
        proc.stop()


def parse_peak(body: bytes, settings: RewardServerConfig) -> tuple[int, object]:
    """The most memory parse_texts allocated beyond the body it was given, and what it returned (or raised)."""
    raw = bytearray(body)
    tracemalloc.start()
    try:
        result = parse_texts(raw, settings)
    except HTTPException as exc:
        result = exc
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, result


@pytest.mark.parametrize("shape", ["empty lists", "empty objects", "short two-byte texts", "short emoji texts",
                                   "ASCII with an emoji", "escaped astral", "emoji and escapes"])
def test_no_body_costs_more_memory_than_its_request_reserves(shape):
    """json.loads would turn `[[],[],...]` into 56-byte lists from 3 body bytes each (and `[{},...]` alike): 20 times
    the body. The parser builds only strings, refuses other items at once, and what it builds stays within the
    request_cost the request reserved before its body was read."""
    settings = RewardServerConfig(max_texts_per_request=256, max_chars=2000)
    n, c = settings.max_texts_per_request, settings.max_chars
    fill = (max_body_bytes(settings) - 20) // 3
    body = {
        "empty lists": b'{"texts": [' + b"[]," * fill + b"[]]}",
        "empty objects": b'{"texts": [' + b"{}," * fill + b"{}]}",
        "short two-byte texts": json.dumps({"texts": ["\u0101"] * n}, ensure_ascii=False, separators=(",", ":")).encode(),
        "short emoji texts": json.dumps({"texts": ["\U0001F600"] * n}, ensure_ascii=False, separators=(",", ":")).encode(),
        "ASCII with an emoji": json.dumps({"texts": ["a" * (c - 1) + "\U0001F600"] * n}, ensure_ascii=False).encode(),
        "escaped astral": json.dumps({"texts": ["\U0001F600" * c] * n}).encode(),
        "emoji and escapes": json.dumps({"texts": ["\U0001F600\n" * (c // 2)] * n}, ensure_ascii=False).encode(),
    }[shape]
    assert len(body) <= max_body_bytes(settings)
    peak, result = parse_peak(body, settings)
    assert peak <= request_cost(len(body), settings) - len(body), f"{peak} bytes from a {len(body)}-byte body"
    if shape.startswith("empty"):
        assert isinstance(result, HTTPException) and result.status_code == 422
    else:
        assert isinstance(result, list) and len(result) == n


def test_server_binds_loopback_by_default(server):
    port_hex = f"{server.port:04X}"
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if local.endswith(f":{port_hex}") and state == "0A":  # 0A = LISTEN
                listening.append(local.split(":")[0])
    assert listening == ["0100007F"]  # 127.0.0.1 only, not 0.0.0.0 (00000000) nor any IPv6 address


def test_server_cli_with_missing_model_exits_with_one_clear_line(tmp_path):
    missing = tmp_path / "no-model-here"
    done = subprocess.run([sys.executable, "-m", "rewards.server", "--reward.model_name_or_path", str(missing),
                           "--reward_server.port", str(free_port())],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rewards.server: error:")
    assert str(missing) in lines[0] and "does not exist" in lines[0]


def run_server_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rewards.server", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, env=env)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # Checked before any model loads: the missing model directory is never reached.
        (["--reward_server.max_queue", "0"], "reward_server.max_queue must be a positive integer, got 0"),
        (["--reward.batch_size", "-4"], "reward.batch_size must be a positive integer, got -4"),
        (["--reward_server.port", "70000"], "reward_server.port must be between 1 and 65535"),
        (["--reward_server.max_wait_ms", "soon"], "'reward_server.max_wait_ms' must be a number"),
        (["--reward_server.max_queu", "5"], "did you mean '--reward_server.max_queue'"),
        (["--ppo.steps", "5"], "unknown option --ppo"),
        # The former flags name the keys that replaced them.
        (["--model", "x"], "--model was replaced: use --reward.model_name_or_path"),
        (["--max-batch-size", "8"], "--max-batch-size was replaced: use --reward.batch_size"),
        (["--trust-remote-code"], "--trust-remote-code was replaced: use --reward.trust_remote_code true"),
        (["--reward_server.require_token", "true", "--reward.token_env", "DETOX_TEST_NO_SUCH_VARIABLE"],
         "DETOX_TEST_NO_SUCH_VARIABLE (reward.token_env) is not set"),
        # A token variable named on purpose must be set: no silent start without authentication.
        (["--reward.token_env", "DETOX_TEST_NO_SUCH_VARIABLE"],
         "reward.token_env names DETOX_TEST_NO_SUCH_VARIABLE, which is not set or empty"),
        # The reward section's client settings mean nothing to the server.
        (["--reward.url", "http://127.0.0.1:8500"], "--reward.url is a client setting"),
        (["--reward.text=summary"], "--reward.text is a client setting"),
    ],
)
def test_server_refuses_bad_settings_in_one_line_before_loading_the_model(tmp_path, args, message):
    done = run_server_cli("--reward.model_name_or_path", str(tmp_path / "no-model-here"), *args)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rewards.server: error:") and message in lines[0], done.stderr
    assert "does not exist" not in lines[0]


def test_server_settings_from_a_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("seed: 1\nsft:\n  max_steps: 3\nreward:\n  model_name_or_path: some/dir\n  batch_size: 8\n"
                      "reward_server:\n  port: 9001\n  max_chars: 100\n")
    cfg = parse_args(["--config", str(recipe), "--reward_server.port=9002", "--reward.device", "cuda:7"])
    assert (cfg.reward.model_name_or_path, cfg.reward.batch_size, cfg.reward.device) == ("some/dir", 8, "cuda:7")
    assert (cfg.reward_server.port, cfg.reward_server.max_chars, cfg.reward_server.host) == (9002, 100, "127.0.0.1")
    defaults = parse_args([])
    assert defaults.reward == RewardConfig() and defaults.reward_server == RewardServerConfig()
    recipe.write_text("reward_server:\n  prot: 9001\n")  # unknown keys inside the two sections are errors
    with pytest.raises(ConfigError, match="unknown key 'reward_server.prot'; did you mean 'reward_server.port'"):
        parse_args(["--config", str(recipe)])
    help_text = run_server_cli("--help").stdout
    assert "--section.key VALUE" in help_text and "--reward_server.max_texts_per_request (default 256)" in help_text


def test_token_from_the_default_variable_is_optional_and_from_a_named_one_required(monkeypatch):
    default, named = RewardConfig(), RewardConfig(token_env="DETOX_TEST_TOKEN")
    monkeypatch.delenv(default.token_env, raising=False)
    monkeypatch.delenv(named.token_env, raising=False)
    assert read_token(default, RewardServerConfig()) is None  # the default variable unset: no token, allowed
    with pytest.raises(ConfigError, match="require_token is true but the environment variable DETOX_REWARD_TOKEN"):
        read_token(default, RewardServerConfig(require_token=True))
    # A variable named on purpose (recipe or command line) that is unset or empty refuses, as it always did.
    for value in (None, ""):
        if value is not None:
            monkeypatch.setenv(named.token_env, value)
        with pytest.raises(ConfigError, match="reward.token_env names DETOX_TEST_TOKEN, which is not set or empty"):
            read_token(named, RewardServerConfig())
    monkeypatch.setenv(named.token_env, "s3cret")
    assert read_token(named, RewardServerConfig(require_token=True)) == "s3cret"
    monkeypatch.setenv(default.token_env, "other")
    assert read_token(default, RewardServerConfig()) == "other"


def test_client_settings_may_stay_in_a_recipe_but_not_on_the_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("reward:\n  url: http://127.0.0.1:8500\n  text: summary\n  timeout_s: 5\n  max_retries: 1\n")
    assert parse_args(["--config", str(recipe)]).reward.url == "http://127.0.0.1:8500"  # the recipe feeds training too
    for key, value in (("text", "summary"), ("url", "http://x"), ("timeout_s", "5"), ("max_retries", "1")):
        with pytest.raises(ConfigError, match=f"^--reward.{key} is a client setting"):
            parse_args(["--config", str(recipe), f"--reward.{key}", value])


class FakeScorer:
    """Scores a text as its length; records the batches it was given."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def score(self, texts: list[str]) -> RewardScores:
        self.batches.append(len(texts))
        lengths = torch.tensor([float(len(t)) for t in texts])
        return RewardScores(lengths, torch.zeros(len(texts)), torch.stack([lengths, -lengths], dim=1))

    def describe(self) -> dict:
        return {"model": "fake", "labels": {0: "nothate", 1: "hate"}, "device": "cpu"}


def test_batcher_slices_results_per_request_and_respects_max_batch_size():
    scorer = FakeScorer()

    async def scenario() -> list[RewardScores]:
        batcher = DynamicBatcher(scorer.score, max_batch_size=8, max_wait_ms=50, max_queue=100)
        worker = asyncio.create_task(batcher.run())
        jobs = [["a" * (10 * j + i + 1) for i in range(1 + j % 3)] for j in range(10)]
        try:
            results = await asyncio.gather(*(batcher.submit(texts) for texts in jobs))
        finally:
            worker.cancel()
        return jobs, results

    jobs, results = asyncio.run(scenario())
    for texts, scores in zip(jobs, results):
        assert scores.rewards.tolist() == [float(len(t)) for t in texts]
    assert sum(scorer.batches) == sum(len(j) for j in jobs)
    assert max(scorer.batches) <= 8 and len(scorer.batches) < len(jobs)


def test_full_queue_answers_503():
    settings = RewardServerConfig(max_queue=1)
    app = build_app(FakeScorer(), settings, token=None)  # lifespan not run: no worker drains the queue

    async def scenario() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            waiting = asyncio.create_task(client.post("/score", json={"texts": ["first"]}))
            while app.state.batcher.queue.qsize() < 1:
                await asyncio.sleep(0.01)
            rejected = await client.post("/score", json={"texts": ["second"]})
            waiting.cancel()
            return rejected

    response = asyncio.run(scenario())
    assert response.status_code == 503
    assert "queue is full (1 requests waiting)" in response.json()["detail"]
    with pytest.raises(QueueFullError):
        asyncio.run(_submit_twice(DynamicBatcher(FakeScorer().score, 4, 1, max_queue=1)))


async def _submit_twice(batcher: DynamicBatcher) -> None:
    first = asyncio.create_task(batcher.submit(["a"]))
    await asyncio.sleep(0)
    try:
        await batcher.submit(["b"])
    finally:
        first.cancel()


# ----------------------------------------------------------------------------------------------------
# The app in process, driven over ASGI message by message: stalled, hung-up and oddly framed uploads.

SMALL = RewardServerConfig(max_texts_per_request=4, max_chars=100, max_wait_ms=1)
SMALL_BODY = max_body_bytes(SMALL)


async def asgi_post(app, parts: list, headers: dict[str, str], path: str = "/score") -> tuple[int, dict, bytes]:
    """POST to `app` over ASGI. `parts` are the body's chunks in turn; "stall" then sends nothing more, ever, and
    "gone" is the client hanging up. Returns the status, headers and body of the answer."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
             "client": ("127.0.0.1", 5000), "server": ("test", 80)}
    answer: dict = {"body": b""}

    receive = replaying_receive(parts)

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["headers"] = {k.decode(): v.decode() for k, v in message.get("headers", [])}
        else:
            answer["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return answer["status"], answer["headers"], answer["body"]


def score_body(*texts: str) -> bytes:
    return json.dumps({"texts": list(texts)}).encode()


async def serving(app):
    """Start the batcher's worker of an app whose lifespan does not run here."""
    return asyncio.create_task(app.state.batcher.run())


def test_a_body_is_read_only_up_to_what_its_request_reserved():
    """The reservation bounds the read: a body longer than its Content-Length is refused, and a request with
    Transfer-Encoding reserves the whole limit (a "Content-Length: 0" sent with it reserved 0 bytes and then streamed
    up to the limit)."""
    app = build_app(FakeScorer(), SMALL)

    async def scenario():
        worker = await serving(app)
        body = score_body("hi")
        longer = await asgi_post(app, [body[:10], body[10:]], {"content-length": "10"})
        framed = await asgi_post(app, [body], {"content-length": "0", "transfer-encoding": "chunked"})
        worker.cancel()
        return longer, framed

    (status, headers, text), framed = asyncio.run(scenario())
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(text)["detail"].startswith("the request body is longer than its Content-Length (10 bytes): ")
    assert framed[0] == 200 and app.state.budget.peak == request_cost(SMALL_BODY, SMALL)
    assert app.state.budget.held == 0


def test_a_stalled_upload_gets_408_and_frees_its_reservation():
    """Two connections declaring maximum-size bodies and sending nothing held the whole budget forever: every other
    request was answered 503. Now a body must arrive within the deadline; the request behind them waits for room
    (its body unread) and is served once the stalled ones are refused."""
    app = build_app(FakeScorer(), SMALL, body_deadline_s=0.3, budget_wait_s=10)
    stalled = {"content-length": str(SMALL_BODY)}

    async def scenario():
        worker = await serving(app)
        first = asyncio.create_task(asgi_post(app, [b'{"texts": [', "stall"], stalled))
        second = asyncio.create_task(asgi_post(app, ["stall"], stalled))
        await asyncio.sleep(0.05)
        assert app.state.budget.held == app.state.budget.limit  # the two fill the budget
        body = score_body("abc")
        third = asyncio.create_task(asgi_post(app, [body], {"content-length": str(len(body))}))
        results = await asyncio.wait_for(asyncio.gather(first, second, third), timeout=5)
        worker.cancel()
        return results

    (s1, h1, b1), (s2, h2, _), (s3, _, b3) = asyncio.run(scenario())
    assert (s1, s2, s3) == (408, 408, 200)
    assert h1["connection"] == h2["connection"] == "close"
    assert json.loads(b1)["detail"] == f"the request body did not arrive within 0.3 s (11 of {SMALL_BODY} bytes came)"
    assert json.loads(b3)["rewards"] == [3.0]
    assert app.state.budget.held == 0


def test_no_room_within_the_wait_is_a_503_that_closes_the_connection():
    app = build_app(FakeScorer(), SMALL, body_deadline_s=10, budget_wait_s=0.1)

    async def scenario():
        stalled = [asyncio.create_task(asgi_post(app, ["stall"], {"content-length": str(SMALL_BODY)}))
                   for _ in range(BODIES_IN_MEMORY)]
        await asyncio.sleep(0.05)
        body = score_body("abc")
        busy = await asgi_post(app, [body], {"content-length": str(len(body))})
        for task in stalled:
            task.cancel()
        return busy

    status, headers, body = asyncio.run(scenario())
    assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
    assert json.loads(body)["detail"].startswith("reward server is busy: ")
    assert app.state.budget.held == 0 and app.state.budget.waiting == 0


@pytest.mark.parametrize(("length", "status"), [("\xb2", 400), ("1_0", 400), ("-1", 400), ("9" * 21, 400),
                                                (str(SMALL_BODY + 1), 413)])
def test_a_content_length_is_ascii_digits_within_the_limit(length, status):
    # "²" is a digit to str.isdigit, and int() then raised: a 500 from the reward server, a 400 from the human app.
    app = build_app(FakeScorer(), SMALL)
    code, headers, _ = asyncio.run(asgi_post(app, [b"{}"], {"content-length": length}))
    assert code == status and headers["connection"] == "close"
    assert app.state.budget.held == 0


def test_a_client_hanging_up_mid_body_is_one_log_line(caplog):
    """ClientDisconnect escaped the handler: Starlette logged "Exception in ASGI application" and a traceback."""
    app = build_app(FakeScorer(), SMALL)
    with caplog.at_level(logging.INFO):
        asyncio.run(asgi_post(app, [b'{"texts": ["ab', "gone"], {"content-length": "40"}))
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in records] == [
        "POST /score: the client closed the connection before sending its whole body; nothing to answer"]
    assert records[0].exc_info is None and app.state.budget.held == 0


def test_the_largest_body_the_limits_allow_fits_max_body_bytes():
    # json.dumps escapes a character beyond the BMP as two \uXXXX: 12 bytes, where 6 were counted (a false 413).
    settings = RewardServerConfig(max_texts_per_request=64, max_chars=2000)
    for char in ("\U0001F600", "\u00e9", '"', "\x00"):
        body = json.dumps({"texts": [char * 2000] * 64}).encode()
        assert len(body) <= max_body_bytes(settings)
        assert len(parse_texts(bytearray(body), settings)) == 64


class FailingScorer(FakeScorer):
    """Fails any batch holding the text "boom", as the tokenizer failed on a lone surrogate."""

    def score(self, texts: list[str]) -> RewardScores:
        if "boom" in texts:
            self.batches.append(-len(texts))
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        return super().score(texts)


def test_a_failing_batch_is_scored_request_by_request_so_only_the_culprit_fails():
    scorer = FailingScorer()

    async def scenario():
        batcher = DynamicBatcher(scorer.score, max_batch_size=8, max_wait_ms=100, max_queue=10)
        worker = asyncio.create_task(batcher.run())
        results = await asyncio.gather(batcher.submit(["a"]), batcher.submit(["boom", "x"]), batcher.submit(["ccc"]),
                                       return_exceptions=True)
        after = await batcher.submit(["dd"])  # the worker goes on
        worker.cancel()
        return results, after

    (first, culprit, third), after = asyncio.run(scenario())
    assert first.rewards.tolist() == [1.0] and third.rewards.tolist() == [3.0] and after.rewards.tolist() == [2.0]
    assert isinstance(culprit, TypeError)
    assert scorer.batches == [-4, 1, -2, 1, 1]  # the batch of three requests, then each alone


def test_a_dead_worker_fails_the_waiting_requests_and_health_says_so():
    """If the worker stopped, the requests waiting for it hung forever, holding their reservations."""
    app = build_app(FakeScorer(), SMALL)
    batcher = app.state.batcher

    async def broken_collect():
        raise RuntimeError("a bug in collecting")

    async def scenario():
        body = score_body("abc")
        waiting = asyncio.create_task(asgi_post(app, [body], {"content-length": str(len(body))}))
        while batcher.queue.qsize() < 1:
            await asyncio.sleep(0.01)
        batcher._collect = broken_collect
        worker = asyncio.create_task(batcher.run())
        answer = await asyncio.wait_for(waiting, timeout=5)
        with pytest.raises(RuntimeError):
            await worker
        health = await httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test").get("/health")
        return answer, health

    (status, _, body), health = asyncio.run(scenario())
    assert status == 500 and json.loads(body)["detail"] == (
        "scoring failed: WorkerStopped: the scoring worker stopped (RuntimeError: a bug in collecting)")
    assert health.status_code == 503 and health.json() == {
        "status": "unhealthy", "detail": "the scoring worker stopped (RuntimeError: a bug in collecting)"}
    assert app.state.budget.held == 0
    with pytest.raises(WorkerStopped):
        asyncio.run(batcher.submit(["late"]))
