"""The reward server as a real subprocess (`python -m rewards.server`): same scores as in-process, dynamic batching
across concurrent clients, request validation, loopback binding, the client's behaviour when the server dies,
and the startup error for a missing model. The batcher's queue limit is checked in-process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from rewards.client import RewardClient, total_backoff_s
from rewards.config import RewardConfig, RewardServerConfig
from rewards.errors import ConfigError, RewardError
from rewards.scorer import RewardScorer, RewardScores
from rewards.server import DynamicBatcher, QueueFullError, build_app, parse_args
from helpers import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-123"
MAX_TEXTS, MAX_CHARS = 16, 400
STARTUP_TIMEOUT_S = 60


class ServerProcess:
    def __init__(self, model: Path, *extra: str, token: str | None = TOKEN) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "DETOX_REWARD_TOKEN"}
        if token:
            env["DETOX_REWARD_TOKEN"] = token
        command = [sys.executable, "-m", "rewards.server", *extra, "--reward.model_name_or_path", str(model),
                   "--reward.device", "cpu", "--reward_server.port", str(self.port), "--reward_server.log_level", "warning"]
        self.proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"reward server exited with {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"reward server did not answer /health within {STARTUP_TIMEOUT_S} s")

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/stats", timeout=5).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture(scope="module")
def server(tiny_artifacts):
    # A 30 ms wait gives concurrent requests time to meet in one batch.
    proc = ServerProcess(tiny_artifacts.roberta, "--reward.batch_size", "32", "--reward_server.max_wait_ms", "30",
                         "--reward_server.max_texts_per_request", str(MAX_TEXTS), "--reward_server.max_chars", str(MAX_CHARS))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def local_scorer(tiny_artifacts):
    return RewardScorer.from_config(RewardConfig(model_name_or_path=str(tiny_artifacts.roberta), device="cpu"))


def texts_for(worker: int, request: int) -> list[str]:
    """Different texts (and different counts) for every request, half of them hateful in the tiny classifier's terms."""
    base = ["#Person1# thanks #Person2# for the kind help.", "You are a stupid lazy coward, I hate you.",
            "What a helpful host you are.", "What an incompetent moron you are."]
    return [f"{base[(worker + i) % 4]} ({worker}-{request}-{i})" for i in range(1 + (worker + request) % 4)]


def assert_same_scores(actual: RewardScores, expected: RewardScores) -> None:
    torch.testing.assert_close(actual.rewards, expected.rewards, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual.toxicity, expected.toxicity, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=1e-5)


def test_health_reports_model_labels_and_device(server, tiny_artifacts):
    health = httpx.get(f"{server.url}/health", timeout=5).json()
    assert health["status"] == "ok" and health["device"] == "cpu"
    assert health["model"] == str(tiny_artifacts.roberta)
    assert health["labels"] == {"0": "nothate", "1": "hate"}
    # The limits clients read to split their batches (rewards.client), and the texts per model call.
    assert (health["max_texts_per_request"], health["max_chars"], health["max_batch_size"]) == (MAX_TEXTS, MAX_CHARS, 32)


def test_server_scores_equal_in_process_scores(server, local_scorer):
    texts = [texts_for(w, 0)[0] for w in range(8)] + ["", "x" * MAX_CHARS]
    with RewardClient(server.url, token=TOKEN) as client:
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
            with RewardClient(server.url, token=TOKEN) as client:
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
        (b'["just", "a", "list"]', {}, 422, 'JSON object {"texts"'),
        (b'{"texts": "one string"}', {}, 422, "must be a list of strings"),
        (b'{"texts": ["ok", 7]}', {}, 422, "item(s) [1] are int"),
        (b'{"texts": []}', {}, 422, "empty"),
        (("{\"texts\": [" + ", ".join(['"x"'] * (MAX_TEXTS + 1)) + "]}").encode(), {}, 413, f"limit is {MAX_TEXTS}"),
        (('{"texts": ["' + "y" * (MAX_CHARS + 1) + '"]}').encode(), {}, 413, f"limit is {MAX_CHARS} per text"),
        (b'{"texts": ["hi"]}', {"Authorization": None}, 401, "missing bearer token"),
        (b'{"texts": ["hi"]}', {"Authorization": "Bearer not-the-token"}, 401, "wrong bearer token"),
        (b'{"texts": ["hi"]}', {"Authorization": "Basic abc"}, 401, "missing bearer token"),
    ],
)
def test_bad_requests_get_a_clear_4xx(server, content, headers, status, message):
    sent = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    sent.update(headers)
    response = httpx.post(f"{server.url}/score", content=content, headers={k: v for k, v in sent.items() if v}, timeout=10)
    assert response.status_code == status
    assert message in response.json()["detail"]


def test_client_reports_the_server_message_for_4xx(server):
    with RewardClient(server.url, token="wrong") as client, pytest.raises(RewardError, match="HTTP 401: wrong bearer token"):
        client.score(["hi"])


def test_server_binds_loopback_by_default(server):
    port_hex = f"{server.port:04X}"
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if local.endswith(f":{port_hex}") and state == "0A":  # 0A = LISTEN
                listening.append(local.split(":")[0])
    assert listening == ["0100007F"]  # 127.0.0.1 only, not 0.0.0.0 (00000000) nor any IPv6 address


def test_client_raises_after_its_retry_budget_when_the_server_dies(tiny_artifacts):
    proc = ServerProcess(tiny_artifacts.roberta, token=None)
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


def test_client_reads_the_servers_request_limit(tiny_artifacts, local_scorer, tmp_path):
    """The client splits by the limit the server reports in /health (read once), not by a constant of its own; the
    server's settings come from a training recipe whose other sections it ignores."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("output_dir: runs/x\nppo:\n  steps: 3\nreward_server:\n  max_texts_per_request: 3\n"
                      "  max_wait_ms: 0\n")
    proc = ServerProcess(tiny_artifacts.roberta, "--config", str(recipe), token=None)
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
