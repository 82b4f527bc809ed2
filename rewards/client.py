"""HTTP client of the reward server (`python -m rewards.server`), interchangeable with the in-process scorer.

Connection errors, timeouts and 5xx answers (503 = server busy) are retried with exponential backoff up to
`max_retries` times, waiting at least what a 503's Retry-After asks (up to MAX_RETRY_AFTER_S); 4xx answers are the
caller's fault and raise at once with the server's message. A malformed URL is refused when the client is built,
never retried. Every answer is checked to hold exactly one reward per text, every number finite and every toxicity
a probability, so a run never continues on missing, stale or broken scores.
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

MAX_RETRY_AFTER_S = 30.0  # a server asking for longer is not waited on beyond this per attempt
URL_EXAMPLE = "http://127.0.0.1:8500"


def check_url(url: str) -> str:
    """`url` without a trailing slash, or one RewardError naming what is wrong with it: a malformed URL would
    otherwise fail every attempt and read like a server that is down."""
    if not isinstance(url, str) or not url.strip():
        raise RewardError(f"reward server URL {url!r} is empty: use e.g. {URL_EXAMPLE}")
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise RewardError(f"reward server URL {url!r} is malformed ({exc}): use e.g. {URL_EXAMPLE}") from None
    if parsed.scheme not in ("http", "https"):
        what = f"scheme {parsed.scheme!r} is not supported" if parsed.scheme else "it has no scheme"
        raise RewardError(f"reward server URL {url!r} is malformed: {what}; use http:// or https://, e.g. {URL_EXAMPLE}")
    if not parsed.host:
        raise RewardError(f"reward server URL {url!r} is malformed: it names no host; use e.g. {URL_EXAMPLE}")
    if port is not None and not 0 < port < 65536:
        raise RewardError(f"reward server URL {url!r} is malformed: port {port} is not in 1..65535")
    if parsed.query or parsed.fragment or any(c.isspace() for c in url):
        raise RewardError(f"reward server URL {url!r} is malformed: no spaces, query or fragment; use e.g. {URL_EXAMPLE}")
    return url.rstrip("/")


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
        self.url = check_url(url)
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
        last_error, retry_after = "", 0.0
        for attempt in range(attempts):
            if attempt:
                time.sleep(max(self.backoff_s * 2 ** (attempt - 1), retry_after))
            retry_after = 0.0
            try:
                response = self._http.request(method, path, json=json)
            except httpx.TransportError as exc:
                last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            except httpx.InvalidURL as exc:
                raise RewardError(f"reward server URL {self.url!r} is invalid: {exc}") from exc
            if response.status_code >= 500:
                last_error = f"HTTP {response.status_code}: {_detail(response)}"
                retry_after = _retry_after_s(response)
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
        for name, values in (("rewards", rewards), ("toxicity", toxicity), ("logits", logits)):
            bad = ~torch.isfinite(values)
            if bad.any():
                raise RewardError(f"reward server at {self.url} sent a non-finite value in {name} "
                                  f"({values[bad][0].item()} for text {bad.nonzero()[0][0].item()})")
        outside = (toxicity < 0) | (toxicity > 1)
        if outside.any():
            index = int(outside.nonzero()[0][0])
            raise RewardError(f"reward server at {self.url} sent toxicity {toxicity[index].item()} for text {index}: "
                              "a toxicity is a probability in [0, 1]")
        return RewardScores(rewards=rewards, toxicity=toxicity, logits=logits)

    def score_pairs(self, prompts: Sequence[str], summaries: Sequence[str], mode: str = "prompt_and_summary") -> RewardScores:
        return self.score(scored_texts(prompts, summaries, mode))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _retry_after_s(response: httpx.Response) -> float:
    """Seconds a Retry-After header (in seconds; an HTTP date is ignored) asks to wait, capped; 0 without one."""
    try:
        seconds = float(response.headers.get("retry-after", "0"))
    except ValueError:
        return 0.0
    return min(seconds, MAX_RETRY_AFTER_S) if math.isfinite(seconds) and seconds > 0 else 0.0


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text
    return str(detail)[:500] or "(empty body)"


def total_backoff_s(max_retries: int, backoff_s: float) -> float:
    """Seconds a client sleeps in all before giving up on a dead server (plus its connection attempts)."""
    return math.fsum(backoff_s * 2**i for i in range(max_retries))
