"""HTTP client of the reward server (`python -m rewards.server`), interchangeable with the in-process scorer.

Connection errors, timeouts and 5xx answers (503 = server queue full) are retried with exponential backoff up to
`max_retries` times; 4xx answers are the caller's fault and raise at once with the server's message. Every answer
is checked to hold exactly one finite reward per text, so a run never continues on missing or stale rewards.
Batches larger than the server accepts in one request are split: the client asks `GET /health` for the server's
`max_texts_per_request` before its first request (once; an explicit `max_texts_per_request` can only lower it).
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import httpx
import torch

from rewards.config import RewardConfig
from rewards.errors import RewardError
from rewards.scorer import RewardScores, check_texts, scored_texts


class RewardClient:
    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout_s: float = RewardConfig.timeout_s,
        max_retries: int = RewardConfig.max_retries,
        backoff_s: float = 0.5,
        max_texts_per_request: int | None = None,  # a cap below the server's limit; None = the server's limit
        transport: httpx.BaseTransport | None = None,  # tests inject an httpx.MockTransport
    ) -> None:
        if max_retries < 0 or backoff_s < 0 or timeout_s <= 0 or (max_texts_per_request is not None and max_texts_per_request < 1):
            raise RewardError(
                "RewardClient needs timeout_s > 0, max_retries >= 0, backoff_s >= 0 and max_texts_per_request >= 1"
            )
        self.url = url.rstrip("/")
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.cap_texts_per_request = max_texts_per_request
        self._chunk_size: int | None = None  # texts per request: min(server limit, cap), read lazily from /health
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # trust_env=False: a proxy from the environment must not sit between trainer and a cluster-local server.
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            trust_env=False,
            transport=transport,
        )

    def _request(self, method: str, path: str, json: Any = None) -> Any:
        attempts = self.max_retries + 1
        last_error = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self._http.request(method, path, json=json)
            except httpx.TransportError as exc:
                last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            except httpx.InvalidURL as exc:
                raise RewardError(f"reward server URL {self.url!r} is invalid: {exc}") from exc
            if response.status_code >= 500:
                last_error = f"HTTP {response.status_code}: {_detail(response)}"
                continue
            if response.status_code >= 400:
                raise RewardError(
                    f"reward server at {self.url} refused {method} {path} with HTTP {response.status_code}: "
                    f"{_detail(response)}"
                )
            try:
                return response.json()
            except ValueError as exc:
                raise RewardError(f"reward server at {self.url} answered {path} with something that is not JSON") from exc
        raise RewardError(
            f"reward server at {self.url} did not answer after {attempts} attempts ({last_error}): "
            "is `python -m rewards.server` running?"
        )

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    @property
    def max_texts_per_request(self) -> int:
        """Texts per /score request: the server's limit from /health (asked once), lowered by the constructor's cap."""
        if self._chunk_size is None:
            health = self.health()
            limit = health.get("max_texts_per_request") if isinstance(health, dict) else None
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                raise RewardError(
                    f"reward server at {self.url} does not report max_texts_per_request in /health (got {limit!r}): "
                    "is it an older `python -m rewards.server`? Restart it from this version"
                )
            self._chunk_size = min(limit, self.cap_texts_per_request or limit)
        return self._chunk_size

    def score(self, texts: Sequence[str]) -> RewardScores:
        texts = check_texts(texts)
        if not texts:
            raise RewardError("nothing to score: the list of texts is empty")
        size = self.max_texts_per_request
        parts = [self._score_chunk(texts[start : start + size]) for start in range(0, len(texts), size)]
        return RewardScores.concat(parts)

    def _score_chunk(self, texts: list[str]) -> RewardScores:
        body = self._request("POST", "/score", json={"texts": texts})
        try:
            rewards = torch.tensor(body["rewards"], dtype=torch.float32)
            toxicity = torch.tensor(body["toxicity"], dtype=torch.float32)
            logits = torch.tensor(body["logits"], dtype=torch.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise RewardError(f"reward server at {self.url} sent a malformed /score answer ({exc!r})") from exc
        n = len(texts)
        if rewards.shape != (n,) or toxicity.shape != (n,) or logits.ndim != 2 or logits.shape[0] != n:
            raise RewardError(
                f"reward server at {self.url} sent {tuple(rewards.shape)} rewards, {tuple(toxicity.shape)} toxicity "
                f"and {tuple(logits.shape)} logits for {n} texts: expected exactly one score per text"
            )
        if not (torch.isfinite(rewards).all() and torch.isfinite(toxicity).all()):
            raise RewardError(f"reward server at {self.url} sent non-finite rewards or toxicity")
        return RewardScores(rewards=rewards, toxicity=toxicity, logits=logits)

    def score_pairs(self, prompts: Sequence[str], summaries: Sequence[str], mode: str = "prompt_and_summary") -> RewardScores:
        return self.score(scored_texts(prompts, summaries, mode))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text
    return str(detail)[:500] or "(empty body)"


def total_backoff_s(max_retries: int, backoff_s: float) -> float:
    """Seconds a client sleeps in all before giving up on a dead server (plus its connection attempts)."""
    return math.fsum(backoff_s * 2**i for i in range(max_retries))
