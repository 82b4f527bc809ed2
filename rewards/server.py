"""Reward server: the hate-speech classifier on its own device, scoring texts for any number of trainers over HTTP.

    DETOX_REWARD_TOKEN=secret python -m rewards.server --model PATH_OR_ID --device cuda:7 --port 8500

`POST /score {"texts": [...]}` -> `{"rewards": [...], "toxicity": [...], "logits": [[...], ...]}`;
`GET /health` -> model, labels, device and batching statistics. Concurrent requests are batched dynamically: they
wait in a bounded queue (full -> 503) and one worker runs up to --max-batch-size texts at a time, after waiting at
most --max-wait-ms for company, in its own thread so the event loop keeps accepting requests meanwhile.
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

from rewards.config import RewardConfig
from rewards.errors import RewardError
from rewards.scorer import RewardScorer, RewardScores

DEFAULT_TOKEN_ENV = "DETOX_REWARD_TOKEN"


@dataclass
class ServerSettings:
    max_batch_size: int = 64
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_texts_per_request: int = 256
    max_chars: int = 20000


class QueueFullError(Exception):
    pass


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


def validate_texts(body: Any, settings: ServerSettings) -> list[str]:
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


def build_app(scorer: Any, settings: ServerSettings, token: str | None = None) -> FastAPI:
    """A FastAPI app serving `scorer` (anything with .score(texts) and .describe())."""
    batcher = DynamicBatcher(scorer.score, settings.max_batch_size, settings.max_wait_ms, settings.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()
        with suppress(asyncio.CancelledError):
            await worker

    # JSON may escape each character as \uXXXX: 6 bytes a character, plus quotes and separators.
    max_body = settings.max_texts_per_request * (settings.max_chars * 6 + 4) + 4096
    app = FastAPI(
        title="detox-sum reward server",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        max_body_size=max_body,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.batcher = batcher

    def check_token(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "wrong bearer token", {"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **scorer.describe(), "stats": dict(batcher.stats), "queued": batcher.queue.qsize()}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return {**batcher.stats, "queued": batcher.queue.qsize()}

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        check_token(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise HTTPException(400, 'the body is not valid JSON: send {"texts": ["...", ...]}') from None
        texts = validate_texts(body, settings)
        try:
            scores = await batcher.submit(texts)
        except QueueFullError:
            raise HTTPException(
                503, f"reward server queue is full ({settings.max_queue} requests waiting): retry later"
            ) from None
        except Exception as exc:
            raise HTTPException(500, f"scoring failed: {type(exc).__name__}: {exc}") from None
        return JSONResponse(scores.to_lists())

    return app


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rewards.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="classifier directory or hub id")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda:N' (default auto)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--max-batch-size", type=_positive_int, default=64, help="texts per model call")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    parser.add_argument("--max-queue", type=_positive_int, default=1024, help="requests waiting before 503")
    parser.add_argument("--max-texts-per-request", type=_positive_int, default=256)
    parser.add_argument("--max-chars", type=_positive_int, default=20000, help="characters per text")
    parser.add_argument("--max-length", type=_positive_int, default=None, help="tokens per text (default: the model's)")
    parser.add_argument("--reward-label", default="nothate")
    parser.add_argument("--toxic-label", default="hate")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument(
        "--torch-threads", type=_positive_int, default=None,
        help="CPU threads for the model (default: torch's choice; 1 avoids idle-thread wake-up latency on busy CPUs)",
    )
    parser.add_argument(
        "--token-env", default=None, help=f"environment variable holding the bearer token (default {DEFAULT_TOKEN_ENV}, if set)"
    )
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser.parse_args(argv)


def read_token(token_env: str | None) -> str | None:
    if token_env is None:
        return os.environ.get(DEFAULT_TOKEN_ENV) or None
    token = os.environ.get(token_env)
    if not token:
        raise RewardError(f"--token-env {token_env} names an environment variable that is not set or empty")
    return token


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    try:
        token = read_token(args.token_env)
        cfg = RewardConfig(
            model_name_or_path=args.model,
            reward_label=args.reward_label,
            toxic_label=args.toxic_label,
            device=args.device,
            dtype=args.dtype,
            batch_size=args.max_batch_size,
            max_length=args.max_length,
            trust_remote_code=args.trust_remote_code,
        )
        scorer = RewardScorer.from_config(cfg)
    except RewardError as exc:
        print(f"rewards.server: error: {exc}", file=sys.stderr)
        return 2
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"rewards.server: warning: listening on {args.host} without a token; set {DEFAULT_TOKEN_ENV}", file=sys.stderr)
    settings = ServerSettings(
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_texts_per_request=args.max_texts_per_request,
        max_chars=args.max_chars,
    )
    print(f"rewards.server: {scorer.name} on {scorer.device}, labels {scorer.labels}", file=sys.stderr, flush=True)
    uvicorn.run(build_app(scorer, settings, token), host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
