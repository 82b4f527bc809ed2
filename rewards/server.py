"""Reward server: the hate-speech classifier on its own device, scoring texts for any number of trainers over HTTP.

    python -m rewards.server --reward.model_name_or_path PATH_OR_ID --reward.device cuda:7 --reward_server.port 8500
    DETOX_REWARD_TOKEN=secret python -m rewards.server --config configs/flan_t5_base.yaml --reward.device cuda:7

Settings follow the grammar of every other command: `--config FILE` (optional) and `--section.key VALUE`
overrides. The server reads two sections: `reward` (the classifier: model_name_or_path, labels, device, dtype,
batch_size = texts per model call, max_length, trust_remote_code, token_env) and `reward_server` (host, port,
batching, limits); the other sections of a training recipe belong to training and are ignored, so the recipe a
trainer runs with also starts its server. A top-level key no training recipe has is an error, and so is a client
setting of the reward section (text, url, timeout_s, max_retries) on the command line.

`POST /score {"texts": [...]}` (UTF-8 JSON, that one key) -> `{"rewards": [...], "toxicity": [...], "logits": [[...],
...]}`;
`GET /health` -> status and the request limits (max_texts_per_request, max_chars: clients split their batches to
fit, batch_size: texts per model call), plus model, labels, device and batching statistics for a caller with the
token (or for anyone when no token is set); `GET /stats` -> the statistics alone, with the same rule. Concurrent
requests are batched dynamically: they wait in a bounded queue (full -> 503) and one worker runs up to
reward.batch_size texts at a time, after waiting at most reward_server.max_wait_ms for company, in its own thread so
the event loop keeps accepting requests meanwhile.

Memory is bounded by admission control. Before its body is read, a request reserves what it can cost: the bytes its
Content-Length allows (a body streamed without one may use the whole max_body_bytes) plus the most the texts parsed
from that many bytes can take (Python strings cost up to 18 times their JSON bytes when short, 4 bytes a character
when long; counted by request_cost). All reservations together stay within BODIES_IN_MEMORY maximum-size requests'
worth. A request that does not fit waits, its body unread (costing nothing), for up to BUDGET_WAIT_S in arrival
order, then gets 503 with Retry-After. Its body is then read up to its reservation and no further, within
BODY_DEADLINE_S (a stalled upload gets 408 and frees its reservation), and parsed in a thread by a parser that
builds only the strings of {"texts": [...]}: any other shape is refused at its first wrong item, so no JSON can
turn into more objects than reserved. Memory held for requests (bodies, texts, and the one text each parse is
decoding) therefore stays within the budget, however many clients send and whatever they send.

The bearer token is read from the environment variable named by reward.token_env (DETOX_REWARD_TOKEN). The default
variable may be left unset (no token); any other variable named there must be set, and reward_server.require_token
true refuses to start without a token.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import re
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from rewards.config import (
    CLIENT_REWARD_KEYS, LOOPBACK_HOSTS, SERVED_REWARD_KEYS, RewardConfig, RewardServerConfig, ServerRecipe,
    load_server_config, section_help,
)
from rewards.errors import ConfigError, RewardError
from rewards.http_limits import BodyRefused, ClientGone, content_length, read_bounded
from rewards.scorer import RewardScorer, RewardScores, lone_surrogate

log = logging.getLogger("rewards.server")

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


# Requests the server holds at once, in maximum-size requests: the admission budget is this many times the cost of
# one (request_cost of max_body_bytes), so a lone maximum-size request always fits and memory stays bounded however
# many clients send.
BODIES_IN_MEMORY = 2
RETRY_AFTER_S = 1  # what a 503 asks the client to wait
BUDGET_WAIT_S = 10.0  # how long a request that does not fit waits for room, its body unread, before a 503
BODY_DEADLINE_S = 30.0  # a body must arrive within this; a stalled upload would otherwise keep its reservation
# The most memory the texts parsed from one body byte can take: a lone two-byte character ("\u0101", 5 bytes with
# its quotes and comma) is an 85-byte string with its list pointer (17 bytes a byte; tests/rewards measures it).
TEXT_BYTES_PER_BODY_BYTE = 18
DECODE_BYTES_PER_BODY_BYTE = 8  # decoding one text: its literal as a str and the text being built (measured: 6)
TEXT_OVERHEAD_BYTES = 96  # a string's header (at most 80 bytes) and its pointer in the list, with the list's spare room
CLOSE = {"Connection": "close"}  # an answer sent before the body was read whole: the connection cannot be reused


class QueueFullError(Exception):
    pass


class WorkerStopped(Exception):
    pass


def max_body_bytes(settings: RewardServerConfig) -> int:
    """The largest /score body the limits allow: JSON may escape a character as 12 bytes (a character beyond the
    Basic Multilingual Plane as two \\uXXXX escapes, as json.dumps does by default), plus quotes and separators,
    plus room for the object around the list."""
    return settings.max_texts_per_request * (settings.max_chars * 12 + 4) + 4096


def request_cost(body_bytes: int, settings: RewardServerConfig) -> int:
    """Bytes of memory a /score request of at most `body_bytes` bytes can hold: its body, and the texts parsed from
    it (at most TEXT_BYTES_PER_BODY_BYTE a body byte, and never more than the limits allow: 4 bytes a character),
    and one text being decoded (DECODE_BYTES_PER_BODY_BYTE a byte of its literal: see parse_texts)."""
    texts = settings.max_texts_per_request * (TEXT_OVERHEAD_BYTES + 4 * settings.max_chars)
    decoding = DECODE_BYTES_PER_BODY_BYTE * (12 * settings.max_chars + 2)
    return body_bytes + min((TEXT_BYTES_PER_BODY_BYTE + DECODE_BYTES_PER_BODY_BYTE) * body_bytes, texts + decoding)


class BodyBudget:
    """Bytes of memory reserved by the requests being read, parsed, queued or scored. A request that does not fit
    waits in line: first come, first served, so small requests cannot keep overtaking a large one. The event loop
    is the only user: no lock needed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0
        self._line: deque[tuple[int, asyncio.Future]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._line)

    async def take(self, size: int, wait_s: float) -> bool:
        """Reserve `size` bytes, waiting up to `wait_s` seconds for room; False when there was none by then."""
        if not self._line and self.held + size <= self.limit:
            self._hold(size)
            return True
        entry = (size, asyncio.get_running_loop().create_future())
        self._line.append(entry)
        try:
            await asyncio.wait({entry[1]}, timeout=wait_s)
        except BaseException:  # cancelled while waiting: never keep bytes nobody will give back
            self._leave(entry)
            raise
        if entry[1].done():
            return True
        self._leave(entry)
        return False

    def give(self, size: int) -> None:
        self.held -= size
        self._admit()

    def _hold(self, size: int) -> None:
        self.held += size
        self.peak = max(self.peak, self.held)

    def _admit(self) -> None:
        while self._line and self.held + self._line[0][0] <= self.limit:
            size, granted = self._line.popleft()
            self._hold(size)
            granted.set_result(None)

    def _leave(self, entry: tuple[int, asyncio.Future]) -> None:
        size, granted = entry
        if granted.done():  # admitted just now: hand the bytes back
            self.give(size)
        else:  # leaving the line may let the ones behind in
            self._line.remove(entry)
            granted.cancel()
            self._admit()


@dataclass(eq=False)  # hashed by identity: kept in a set while open
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
        self._open: set[_Job] = set()  # submitted and not answered yet, wherever they are: failed if the worker stops
        self.stopped: str | None = None  # why run() ended, once it has: the server then answers nothing
        # One dedicated thread runs the model: calls stay serialised, and torch keeps one OpenMP pool (pools
        # belong to the calling thread, so a rotating executor would create several that compete for the cores).
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-model")
        self.stats = {"requests": 0, "texts": 0, "batches": 0, "largest_batch": 0, "most_requests_in_a_batch": 0}

    async def submit(self, texts: list[str]) -> RewardScores:
        if self.stopped is not None:
            raise WorkerStopped(self.stopped)
        job = _Job(texts, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFullError from None
        self._open.add(job)
        job.future.add_done_callback(lambda _: self._open.discard(job))
        return await job.future

    async def run(self) -> None:
        try:
            while True:
                jobs = await self._collect()
                try:
                    await self._score(jobs)
                except Exception as exc:  # a failure outside the model call: this batch fails, the worker goes on
                    log.warning("scoring a batch failed: %s: %s", type(exc).__name__, exc)
                    _fail(jobs, exc)
        except BaseException as exc:  # cancelled (shutdown) or broken: nobody would ever answer the waiting requests
            self.stopped = "the server is shutting down" if isinstance(exc, asyncio.CancelledError) else (
                f"the scoring worker stopped ({type(exc).__name__}: {exc})")
            _fail(list(self._open), WorkerStopped(self.stopped))
            raise
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
        # A request cancelled while queued (the server shutting down) needs no scores. A client that hangs up is
        # not noticed here: its texts are scored and the answer is dropped.
        jobs = [job for job in jobs if not job.future.done()]
        if not jobs:
            return
        texts = [text for job in jobs for text in job.texts]
        try:
            scores = await asyncio.get_running_loop().run_in_executor(self._model_thread, self.score_fn, texts)
            if len(scores) != len(texts):
                raise RewardError(f"the scorer returned {len(scores)} scores for {len(texts)} texts")
        except Exception as exc:
            if len(jobs) == 1:  # the model failed on this request: it gets the error, the server lives on
                _fail(jobs, exc)
                return
            # One request's texts may fail the whole batch: score each request alone, so only its own client fails.
            log.warning("a batch of %d requests failed (%s: %s): scoring them one by one", len(jobs),
                        type(exc).__name__, exc)
            for job in jobs:
                await self._score([job])
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


def _fail(jobs: list[_Job], exc: BaseException) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(exc)


_SPACE = re.compile(rb"[ \t\n\r]*")
# A JSON string literal (its escapes are checked when decoded). Possessive: a plain repeat keeps a backtracking
# record per escape, 140 bytes for each 6-byte "\\u0101".
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"')
_KINDS = {ord('"'): "a string", ord("["): "a list", ord("{"): "an object", ord("t"): "a boolean",
          ord("f"): "a boolean", ord("n"): "null", **{c: "a number" for c in b"-0123456789"}}
_NOT_JSON = 'the body is not valid JSON: send {"texts": ["...", ...]}'
_SHAPE = 'the body must be a JSON object {"texts": ["...", ...]}'


def parse_texts(raw: bytearray, settings: RewardServerConfig) -> list[str]:
    """The checked texts of a /score body, which must be UTF-8 JSON of the form {"texts": ["...", ...]}; raw is
    emptied. A general JSON parser would first build whatever the body holds (an empty list costs 56 bytes for its 3
    body bytes, and nesting costs stack), so the body is read here as exactly that shape: only the texts' strings
    are built, each checked as it comes, and anything else is refused at its first byte. A text is decoded from its
    own slice of the body, so besides the body and the texts only one text's decoding exists at a time."""
    try:
        with memoryview(raw) as view:
            return _parse_texts(raw, view, settings)
    finally:
        del raw[:]


def _parse_texts(raw: bytearray, view: memoryview, settings: RewardServerConfig) -> list[str]:
    limit, max_chars = settings.max_texts_per_request, settings.max_chars
    pos = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte order mark

    def skip() -> int:  # past white space, to the next byte (-1 at the end)
        nonlocal pos
        pos = _SPACE.match(raw, pos).end()
        return raw[pos] if pos < len(raw) else -1

    def kind(byte: int) -> str:
        if byte not in _KINDS:
            raise HTTPException(400, _NOT_JSON)
        return _KINDS[byte]

    def string(most_bytes: int) -> str | None:  # the string at pos, or None when it has more than most_bytes
        nonlocal pos
        found = _STRING.match(raw, pos)
        if found is None:
            raise HTTPException(400, _NOT_JSON)
        pos = found.end()
        if found.end() - found.start() - 2 > most_bytes:
            return None
        try:
            literal = str(view[found.start():found.end()], "utf-8")
            value, end = json.decoder.scanstring(literal, 1, True)
        except ValueError:  # not UTF-8, a control character, a bad escape
            raise HTTPException(400, _NOT_JSON) from None
        return value

    if skip() != ord("{"):
        kind(skip())
        raise HTTPException(422, _SHAPE)
    pos += 1
    if (byte := skip()) == ord("}"):
        raise HTTPException(422, _SHAPE)
    if byte != ord('"'):
        raise HTTPException(400, _NOT_JSON)
    key = string(64)
    if key != "texts":
        shown = "a long key" if key is None else f"the key {key[:40]!r}"
        raise HTTPException(422, f'{_SHAPE}, with no other key; it has {shown}')
    if skip() != ord(":"):
        raise HTTPException(400, _NOT_JSON)
    pos += 1
    if (byte := skip()) != ord("["):
        raise HTTPException(422, f'"texts" must be a list of strings, got {kind(byte)}')
    pos += 1
    texts: list[str] = []
    if skip() == ord("]"):
        raise HTTPException(422, '"texts" is empty: send at least one text')
    while True:
        index = len(texts)
        if (byte := skip()) != ord('"'):
            raise HTTPException(422, f'"texts" must hold only strings; item {index} is {kind(byte)}')
        if index == limit:
            raise HTTPException(413, f"more than {limit} texts in one request; the limit is {limit}: split the batch")
        # A character is at most 12 bytes of JSON, so a longer literal has too many characters: not decoded.
        text = string(12 * max_chars)
        if text is None or len(text) > max_chars:
            count = f"more than {max_chars}" if text is None else len(text)
            raise HTTPException(413, f"text {index} has {count} characters; the limit is {max_chars} per text")
        if (at := lone_surrogate(text)) is not None:
            raise HTTPException(422, f"text {index} is not valid Unicode: character {at} is a lone surrogate "
                                     f"({text[at]!r}), which UTF-8 cannot encode")
        texts.append(text)
        if (byte := skip()) == ord(","):
            pos += 1
        elif byte == ord("]"):
            pos += 1
            break
        else:
            raise HTTPException(400, _NOT_JSON)
    if (byte := skip()) == ord(","):
        raise HTTPException(422, f"{_SHAPE}, with no other key")
    if byte != ord("}"):
        raise HTTPException(400, _NOT_JSON)
    pos += 1
    if skip() != -1:
        raise HTTPException(400, _NOT_JSON)
    return texts


def build_app(scorer: Any, settings: RewardServerConfig, token: str | None = None, batch_size: int | None = None,
              *, budget_wait_s: float = BUDGET_WAIT_S, body_deadline_s: float = BODY_DEADLINE_S) -> FastAPI:
    """A FastAPI app serving `scorer` (anything with .score(texts) and .describe()), at most `batch_size` texts
    per model call (default: reward.batch_size's default). The two waits are parameters for tests."""
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
    budget = BodyBudget(BODIES_IN_MEMORY * request_cost(max_body, settings))
    # No max_body_size here: /score bounds its body itself (read_bounded), before reading it and with its own message.
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
        return {**batcher.stats, "queued": batcher.queue.qsize(), "body_bytes_held": budget.held,
                "body_bytes_peak": budget.peak, "body_bytes_limit": budget.limit, "waiting_for_room": budget.waiting}

    def busy(why: str) -> HTTPException:
        return HTTPException(503, f"reward server is busy: {why}: retry after {RETRY_AFTER_S} s",
                             {"Retry-After": str(RETRY_AFTER_S), **CLOSE})

    def refused(exc: BodyRefused) -> HTTPException:
        hint = (": split the batch (a request holds at most max_texts_per_request texts of max_chars characters)"
                if exc.status == 413 else "")
        return HTTPException(exc.status, exc.message + hint, CLOSE)

    @app.get("/health", response_model=None)
    async def health(request: Request) -> dict[str, Any] | JSONResponse:
        # Liveness and the limits clients split by are public (health checks run without the token); what the
        # server runs and its traffic are for token holders only.
        if batcher.stopped is not None:
            return JSONResponse({"status": "unhealthy", "detail": batcher.stopped}, 503)
        public = {"status": "ok", "max_texts_per_request": settings.max_texts_per_request,
                  "max_chars": settings.max_chars, "batch_size": batch_size}
        if token_error(request) is not None:
            return public
        return {**public, **scorer.describe(), "stats": statistics(), "queued": batcher.queue.qsize()}

    @app.get("/stats")
    async def stats(request: Request) -> dict[str, Any]:
        check_token(request)
        return statistics()

    @app.post("/score", response_model=None)
    async def score(request: Request) -> JSONResponse | Response:
        check_token(request)
        try:
            size = content_length(request.headers, max_body, chunked=True)
        except BodyRefused as exc:
            raise refused(exc) from None
        cost = request_cost(size, settings)
        if not await budget.take(cost, budget_wait_s):
            raise busy(f"{budget.held} bytes of requests are being read or scored and {budget.waiting} more wait, "
                       f"the limit is {budget.limit}")
        try:
            try:
                raw = await read_bounded(request, size, body_deadline_s, exact="transfer-encoding" not in request.headers)
            except ClientGone as exc:
                log.warning("POST /score: %s; nothing to answer", exc.message)
                return Response(status_code=400, headers=CLOSE)  # nobody reads it
            except BodyRefused as exc:
                raise refused(exc) from None
            # In a thread: a large body does not stop the event loop from taking other requests meanwhile.
            texts = await asyncio.to_thread(parse_texts, raw, settings)
            del raw
            try:
                scores = await batcher.submit(texts)
            except QueueFullError:
                raise busy(f"its queue is full ({settings.max_queue} requests waiting)") from None
            except Exception as exc:
                raise HTTPException(500, f"scoring failed: {type(exc).__name__}: {exc}") from None
            return JSONResponse(scores.to_lists())
        finally:
            budget.give(cost)

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
