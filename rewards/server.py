"""Reward server: the hate-speech classifier on its own device, scoring texts for any number of trainers over HTTP.

    python -m rewards.server --reward.model_name_or_path PATH_OR_ID --reward.device cuda:7 --reward_server.port 8500
    DETOX_REWARD_TOKEN=secret python -m rewards.server --config configs/flan_t5_base.yaml --reward.device cuda:7

Settings follow the grammar of every other command: `--config FILE` (optional) and `--section.key VALUE`
overrides. The server reads two sections: `reward` (the classifier: model_name_or_path, labels, device, dtype,
batch_size = texts per model call, max_length, trust_remote_code, token_env) and `reward_server` (host, port,
batching, limits); the other sections of a training recipe belong to training and are ignored, so the recipe a
trainer runs with also starts its server. A top-level key no training recipe has is an error, and so is a client
setting of the reward section (text, url, timeout_s, max_retries) on the command line.

`POST /score {"texts": [...]}` -> `{"rewards": [...], "toxicity": [...], "logits": [[...], ...]}`;
`GET /health` -> status and the request limits (max_texts_per_request, max_chars: clients split their batches to
fit, batch_size: texts per model call), plus model, labels, device and batching statistics for a caller with the
token (or for anyone when no token is set); `GET /stats` -> the statistics alone, with the same rule. Concurrent
requests are batched dynamically: they wait in a bounded queue (full -> 503) and one worker runs up to
reward.batch_size texts at a time, after waiting at most reward_server.max_wait_ms for company, in its own thread so
the event loop keeps accepting requests meanwhile.

Memory is bounded by admission control: the bodies of all requests being read, queued or scored together may hold
at most BODIES_IN_MEMORY maximum-size bodies' worth of bytes (max_body_bytes). A request's Content-Length is
reserved before its body is read; one that does not fit gets 503 with Retry-After at once, its body unread, and the
client's retries bring it back. Memory stays near the bytes admitted (about twice them while a body is parsed)
instead of growing with the queue.

The bearer token is read from the environment variable named by reward.token_env (DETOX_REWARD_TOKEN). The default
variable may be left unset (no token); any other variable named there must be set, and reward_server.require_token
true refuses to start without a token.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from rewards.config import (
    CLIENT_REWARD_KEYS, LOOPBACK_HOSTS, SERVED_REWARD_KEYS, RewardConfig, RewardServerConfig, ServerRecipe,
    load_server_config, section_help,
)
from rewards.errors import ConfigError, RewardError
from rewards.scorer import RewardScorer, RewardScores

# The flags of earlier versions and the keys that replaced them: each stops with one line naming its key.
FORMER_FLAGS = {
    "model": "reward.model_name_or_path", "device": "reward.device", "dtype": "reward.dtype",
    "max_batch_size": "reward.batch_size", "max_length": "reward.max_length", "reward_label": "reward.reward_label",
    "toxic_label": "reward.toxic_label", "trust_remote_code": "reward.trust_remote_code: true",
    "token_env": "reward.token_env", "host": "reward_server.host", "port": "reward_server.port",
    "max_wait_ms": "reward_server.max_wait_ms", "max_queue": "reward_server.max_queue",
    "max_texts_per_request": "reward_server.max_texts_per_request", "max_chars": "reward_server.max_chars",
    "torch_threads": "reward_server.torch_threads", "log_level": "reward_server.log_level",
}


# Request bodies the server holds at once, in maximum-size bodies: the admission budget is this many times
# max_body_bytes, so a lone maximum-size request always fits and memory stays bounded however many clients send.
BODIES_IN_MEMORY = 2
RETRY_AFTER_S = 1  # what a 503 asks the client to wait


class QueueFullError(Exception):
    pass


def max_body_bytes(settings: RewardServerConfig) -> int:
    """The largest /score body the limits allow: JSON may escape each character as \\uXXXX (6 bytes a character),
    plus quotes and separators, plus room for the object around the list."""
    return settings.max_texts_per_request * (settings.max_chars * 6 + 4) + 4096


class BodyBudget:
    """Bytes of request bodies admitted and not yet answered. The event loop is the only user: no lock needed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future


class DynamicBatcher:
    """Groups queued requests into batches of at most max_batch_size texts and scores each batch in one call."""

    def __init__(
        self, score_fn: Callable[[list[str]], RewardScores], max_batch_size: int, max_wait_ms: float, max_queue: int
    ) -> None:
        self.score_fn = score_fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=max_queue)
        self._held: _Job | None = None  # a job that did not fit in the previous batch goes first in the next
        # One dedicated thread runs the model: calls stay serialised, and torch keeps one OpenMP pool (pools
        # belong to the calling thread, so a rotating executor would create several that compete for the cores).
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-model")
        self.stats = {"requests": 0, "texts": 0, "batches": 0, "largest_batch": 0, "most_requests_in_a_batch": 0}

    async def submit(self, texts: list[str]) -> RewardScores:
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Job(texts, future))
        except asyncio.QueueFull:
            raise QueueFullError from None
        return await future

    async def run(self) -> None:
        try:
            while True:
                await self._score(await self._collect())
        finally:
            self._model_thread.shutdown(wait=False, cancel_futures=True)

    async def _collect(self) -> list[_Job]:
        first = self._held or await self.queue.get()
        self._held = None
        jobs, size = [first], len(first.texts)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while size < self.max_batch_size:
            try:
                remaining = deadline - loop.time()
                job = self.queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self.queue.get(), remaining)
            except (asyncio.QueueEmpty, TimeoutError):
                break
            if size + len(job.texts) > self.max_batch_size:
                self._held = job
                break
            jobs.append(job)
            size += len(job.texts)
        return jobs

    async def _score(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if not job.future.done()]  # a client that hung up needs no scores
        if not jobs:
            return
        texts = [text for job in jobs for text in job.texts]
        try:
            scores = await asyncio.get_running_loop().run_in_executor(self._model_thread, self.score_fn, texts)
        except Exception as exc:  # the model failed: every waiting request gets the error, the server lives on
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        self.stats["requests"] += len(jobs)
        self.stats["texts"] += len(texts)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(texts))
        self.stats["most_requests_in_a_batch"] = max(self.stats["most_requests_in_a_batch"], len(jobs))
        start = 0
        for job in jobs:
            stop = start + len(job.texts)
            if not job.future.done():
                job.future.set_result(scores.slice(start, stop))
            start = stop


def validate_texts(body: Any, settings: RewardServerConfig) -> list[str]:
    """The texts of a /score body, or an HTTPException with the status and message the client should see."""
    if not isinstance(body, dict) or "texts" not in body:
        raise HTTPException(422, 'the body must be a JSON object {"texts": ["...", ...]}')
    texts = body["texts"]
    if not isinstance(texts, list):
        raise HTTPException(422, f'"texts" must be a list of strings, got {type(texts).__name__}')
    if not texts:
        raise HTTPException(422, '"texts" is empty: send at least one text')
    if len(texts) > settings.max_texts_per_request:
        raise HTTPException(
            413, f"{len(texts)} texts in one request; the limit is {settings.max_texts_per_request}: split the batch"
        )
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise HTTPException(422, f'"texts" must hold only strings; item(s) {bad[:5]} are {type(texts[bad[0]]).__name__}')
    long = [i for i, t in enumerate(texts) if len(t) > settings.max_chars]
    if long:
        raise HTTPException(
            413, f"text {long[0]} has {len(texts[long[0]])} characters; the limit is {settings.max_chars} per text"
        )
    return texts


def declared_size(request: Request, max_body: int) -> int:
    """Bytes to reserve for a request's body, from its Content-Length (checked against the limit before a byte is
    read); a body without one (chunked) reserves the limit, which read_body enforces as it reads."""
    header = request.headers.get("content-length")
    if header is None:
        return max_body
    if not header.isdigit():  # isdigit: no sign, no spaces, no "1e9"
        raise HTTPException(400, f"Content-Length {header[:40]!r} is not a byte count")
    size = int(header)
    if size > max_body:
        raise HTTPException(413, f"the body has {size} bytes; the limit is {max_body} (max_texts_per_request texts of "
                                 "max_chars characters): split the batch")
    return size


async def read_body(request: Request, max_body: int) -> bytearray:
    """The body, read in place (no list of chunks joined at the end), stopping once it passes max_body."""
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > max_body:
            raise HTTPException(413, f"the body has more than {max_body} bytes, the limit: split the batch")
        body += chunk
    return body


def parse_texts(raw: bytearray, settings: RewardServerConfig) -> list[str]:
    """The checked texts of a /score body. The raw bytes are emptied once decoded, so bytes, decoded text and parsed
    texts never exist all at once (json.loads of bytes would keep all three until it returns)."""
    not_json = HTTPException(400, 'the body is not valid JSON: send {"texts": ["...", ...]}')
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")  # what json.loads does with bytes
    except UnicodeDecodeError:
        raise not_json from None
    finally:
        del raw[:]
    try:
        body = json.loads(text)
    except RecursionError:  # json's C parser recurses once per nesting level
        raise HTTPException(400, 'the body is JSON nested too deeply: send {"texts": ["...", ...]}') from None
    except ValueError:
        raise not_json from None
    del text
    return validate_texts(body, settings)


def build_app(scorer: Any, settings: RewardServerConfig, token: str | None = None, batch_size: int | None = None) -> FastAPI:
    """A FastAPI app serving `scorer` (anything with .score(texts) and .describe()), at most `batch_size` texts
    per model call (default: reward.batch_size's default)."""
    batch_size = batch_size or RewardConfig.batch_size
    batcher = DynamicBatcher(scorer.score, batch_size, settings.max_wait_ms, settings.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()
        with suppress(asyncio.CancelledError):
            await worker

    max_body = max_body_bytes(settings)
    budget = BodyBudget(BODIES_IN_MEMORY * max_body)
    # No max_body_size here: /score bounds its body itself (read_body), before reading it and with its own message.
    app = FastAPI(
        title="detox-sum reward server",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.batcher = batcher
    app.state.budget = budget

    def token_error(request: Request) -> HTTPException | None:
        if token is None:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            return HTTPException(401, "wrong bearer token", {"WWW-Authenticate": "Bearer"})
        return None

    def check_token(request: Request) -> None:
        if (error := token_error(request)) is not None:
            raise error

    def statistics() -> dict[str, Any]:
        return {**batcher.stats, "queued": batcher.queue.qsize(), "body_bytes_held": budget.held}

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        # Liveness and the limits clients split by are public (health checks run without the token); what the
        # server runs and its traffic are for token holders only.
        public = {"status": "ok", "max_texts_per_request": settings.max_texts_per_request,
                  "max_chars": settings.max_chars, "batch_size": batch_size}
        if token_error(request) is not None:
            return public
        return {**public, **scorer.describe(), "stats": statistics(), "queued": batcher.queue.qsize()}

    @app.get("/stats")
    async def stats(request: Request) -> dict[str, Any]:
        check_token(request)
        return statistics()

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        check_token(request)
        size = declared_size(request, max_body)
        if not budget.take(size):
            raise HTTPException(
                503, f"reward server is busy: {budget.held} bytes of requests are being read or scored, the limit is "
                f"{budget.limit}: retry after {RETRY_AFTER_S} s", {"Retry-After": str(RETRY_AFTER_S)},
            )
        try:
            texts = parse_texts(await read_body(request, max_body), settings)
            try:
                scores = await batcher.submit(texts)
            except QueueFullError:
                raise HTTPException(
                    503, f"reward server queue is full ({settings.max_queue} requests waiting): retry later",
                    {"Retry-After": str(RETRY_AFTER_S)},
                ) from None
            except Exception as exc:
                raise HTTPException(500, f"scoring failed: {type(exc).__name__}: {exc}") from None
            return JSONResponse(scores.to_lists())
        finally:
            budget.give(size)

    return app


def parse_args(argv: Sequence[str] | None = None) -> ServerRecipe:
    """`--config FILE` (optional) and --reward.* / --reward_server.* overrides -> checked settings."""
    epilog = (
        "Overrides: --section.key VALUE or --section.key=VALUE, e.g.\n"
        "  --reward.model_name_or_path artifacts/tiny/roberta-hate --reward.device cpu --reward_server.port 8500\n"
        "Only the reward and reward_server sections are read: the other sections of a recipe belong to\n"
        f"training and are ignored. The reward section's client settings ({', '.join(CLIENT_REWARD_KEYS)})\n"
        "may stay in a recipe but not on this command line. The keys (see rewards/config.py):\n"
        f"{section_help('reward', RewardConfig(), SERVED_REWARD_KEYS)}\n{section_help('reward_server', RewardServerConfig())}"
    )
    parser = argparse.ArgumentParser(prog="python -m rewards.server", description=__doc__.split("\n\n")[0],
                                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--config", help="YAML recipe (its reward and reward_server sections); default: the defaults")
    args, rest = parser.parse_known_args(argv)
    return load_server_config(args.config, rest, renamed=FORMER_FLAGS)


def read_token(reward: RewardConfig, server: RewardServerConfig) -> str | None:
    """The bearer token from the environment variable reward.token_env. None only when that is the default variable
    (DETOX_REWARD_TOKEN), unset or empty, and reward_server.require_token is false: a variable named on purpose
    (any other reward.token_env) must hold the token, so a missing one refuses to start instead of serving openly."""
    token = os.environ.get(reward.token_env) or None
    if token is None and server.require_token:
        raise ConfigError(f"reward_server.require_token is true but the environment variable {reward.token_env} "
                          "(reward.token_env) is not set or empty: set it to the bearer token")
    if token is None and reward.token_env != RewardConfig.token_env:
        raise ConfigError(f"reward.token_env names {reward.token_env}, which is not set or empty: set it to the bearer "
                          f"token (only the default {RewardConfig.token_env} may be left unset, for no token)")
    return token


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)  # every setting is checked here, before the model loads
        reward, server = cfg.reward, cfg.reward_server
        token = read_token(reward, server)
        if server.torch_threads:
            torch.set_num_threads(server.torch_threads)
        scorer = RewardScorer.from_config(reward)
    except (ConfigError, RewardError) as exc:
        print(f"rewards.server: error: {exc}", file=sys.stderr)
        return 2
    if token is None and server.host not in LOOPBACK_HOSTS:
        print(f"rewards.server: warning: listening on {server.host} without a token; set {reward.token_env}",
              file=sys.stderr)
    print(f"rewards.server: {scorer.name} on {scorer.device}, labels {scorer.labels}", file=sys.stderr, flush=True)
    app = build_app(scorer, server, token, batch_size=reward.batch_size)
    uvicorn.run(app, host=server.host, port=server.port, log_level=server.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
