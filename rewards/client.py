"""HTTP client of the reward server (`python -m rewards.server`), interchangeable with the in-process scorer.

Connection errors, timeouts and 5xx answers are retried with exponential backoff up to `max_retries` times. A 503
with Retry-After says the server is alive and busy: it is retried after what it asks (up to MAX_RETRY_AFTER_S, with
some jitter so waiting trainers do not come back all at once), not counted against max_retries but against
`busy_timeout_s` in all, so many trainers sharing one server wait their turn instead of failing. 4xx answers are the
caller's fault and raise at once with the server's message; so do a malformed URL (when the client is built) and a
host name that does not resolve. Every answer is checked to hold exactly one reward per text, every number a finite
number (not a boolean) and every toxicity a probability, so a run never continues on missing, stale or broken
scores. Texts UTF-8 cannot encode (a lone surrogate) are refused before sending.
Batches larger than the server accepts in one request are split: the client asks `GET /health` for the server's
`max_texts_per_request` before its first request (once; an explicit `max_texts_per_request` can only lower it).
"""

from __future__ import annotations

import math
import random
import re
import socket
import time
from typing import Any, Sequence

import httpx
import torch

from rewards.config import RewardConfig
from rewards.errors import RewardError
from rewards.scorer import RewardScores, check_texts, scored_texts

MAX_RETRY_AFTER_S = 30.0  # a server asking for longer is not waited on beyond this per attempt
BUSY_TIMEOUT_S = 600.0  # how long a request keeps coming back to a busy server (503 + Retry-After) before giving up
# Resolver answers that mean the name does not exist; EAI_AGAIN (no answer from the resolver now) is retried.
_NO_SUCH_HOST = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}
# A host name as HTTP carries it: letters, digits, '-', '_' (container names) and dots; httpx keeps "%zz" as a host.
_HOST_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?")
URL_EXAMPLE = "http://127.0.0.1:8500"


def check_url(url: str) -> str:
    """`url` without a trailing slash, or one RewardError naming what is wrong with it: a malformed URL would
    otherwise fail every attempt and read like a server that is down."""
    if not isinstance(url, str) or not url.strip():
        raise RewardError(f"reward server URL {url!r} is empty: use e.g. {URL_EXAMPLE}")
    try:
        parsed = httpx.URL(url)
        port, host = parsed.port, parsed.host  # .host decodes an "xn--" name, and may fail there
    except (httpx.InvalidURL, ValueError, TypeError) as exc:  # IDNAError is a ValueError
        raise RewardError(f"reward server URL {url!r} is malformed ({exc}): use e.g. {URL_EXAMPLE}") from None
    if parsed.scheme not in ("http", "https"):
        what = f"scheme {parsed.scheme!r} is not supported" if parsed.scheme else "it has no scheme"
        raise RewardError(f"reward server URL {url!r} is malformed: {what}; use http:// or https://, e.g. {URL_EXAMPLE}")
    if not host:
        raise RewardError(f"reward server URL {url!r} is malformed: it names no host; use e.g. {URL_EXAMPLE}")
    if ":" not in host and not _HOST_NAME.fullmatch(parsed.raw_host.decode("ascii")):  # ":": an IPv6 address
        raise RewardError(f"reward server URL {url!r} is malformed: {host!r} is not a host name (letters, digits, "
                          f"'-' and dots); use e.g. {URL_EXAMPLE}")
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
        busy_timeout_s: float = BUSY_TIMEOUT_S,
    ) -> None:
        if (max_retries < 0 or backoff_s < 0 or timeout_s <= 0 or busy_timeout_s < 0
                or (max_texts_per_request is not None and max_texts_per_request < 1)):
            raise RewardError(
                "RewardClient needs timeout_s > 0, max_retries >= 0, backoff_s >= 0, busy_timeout_s >= 0 and "
                "max_texts_per_request >= 1"
            )
        self.url = check_url(url)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.busy_timeout_s = busy_timeout_s
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
        failures = 0  # attempts that count against max_retries: all but busy answers
        busy_since: float | None = None
        last_error, last_kind = "", ""
        while True:
            try:
                response = self._http.request(method, path, json=json)
            except httpx.TransportError as exc:
                if _name_unknown(exc):  # no retry brings a name into existence
                    raise RewardError(f"reward server at {self.url}: host {httpx.URL(self.url).host!r} does not "
                                      f"resolve ({exc}): check reward.url") from None
                last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                last_kind, wait = ("timeout" if isinstance(exc, httpx.TimeoutException) else "connection"), 0.0
            except httpx.InvalidURL as exc:
                raise RewardError(f"reward server URL {self.url!r} is invalid: {exc}") from exc
            else:
                if response.status_code < 400:
                    return self._json(response, path)
                if response.status_code < 500:
                    raise RewardError(
                        f"reward server at {self.url} refused {method} {path} with HTTP {response.status_code}: "
                        f"{_detail(response)}"
                    )
                last_error = f"HTTP {response.status_code}: {_detail(response)}"
                wait = _retry_after_s(response)
                if response.status_code == 503 and "retry-after" in response.headers:
                    wait = max(wait, 0.1)  # "Retry-After: 0" must not become a busy loop
                    # Busy, not broken: come back after what it asks, until busy_timeout_s has passed in all.
                    busy_since = time.monotonic() if busy_since is None else busy_since
                    if time.monotonic() - busy_since + wait <= self.busy_timeout_s:
                        time.sleep(wait * random.uniform(1.0, 1.5))
                        continue
                    last_kind = "busy"
                    break
                last_kind = "server"
            failures += 1
            if failures > self.max_retries:
                break
            time.sleep(max(self.backoff_s * 2 ** (failures - 1), wait))
        if last_kind == "busy":
            raise RewardError(f"reward server at {self.url} was still busy after {self.busy_timeout_s:g} s "
                              f"({last_error}): it has more to score than it can; start another server or run fewer "
                              "trainers on it")
        hints = {  # chosen by how the last attempt failed
            "server": "the server failed: see its log",
            "timeout": f"no answer within reward.timeout_s = {self.timeout_s:g} s: a slow or overloaded server may "
                       "need a larger reward.timeout_s",
            "connection": "is `python -m rewards.server` running?",
        }
        raise RewardError(f"reward server at {self.url} did not answer after {failures} attempts ({last_error}): "
                          f"{hints[last_kind]}")

    def _json(self, response: httpx.Response, path: str) -> Any:
        try:
            return response.json()
        except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python's stack
            raise RewardError(f"reward server at {self.url} answered {path} with something that is not JSON "
                              "(or nested too deeply)") from None

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
        texts = check_texts(texts)  # refuses what UTF-8 cannot encode, which httpx would fail on with a traceback
        if not texts:
            raise RewardError("nothing to score: the list of texts is empty")
        size = self.max_texts_per_request
        parts = [self._score_chunk(texts[start : start + size]) for start in range(0, len(texts), size)]
        widths = [int(part.logits.shape[1]) for part in parts]
        if len(set(widths)) > 1:
            changed = next(i for i, w in enumerate(widths) if w != widths[0])
            raise RewardError(f"reward server at {self.url} sent logits of {widths[changed]} classes for texts from "
                              f"{changed * size} but {widths[0]} before: did the server change its classifier?")
        return RewardScores.concat(parts)

    def _score_chunk(self, texts: list[str]) -> RewardScores:
        body = self._request("POST", "/score", json={"texts": texts})
        n = len(texts)
        if not isinstance(body, dict) or not {"rewards", "toxicity", "logits"} <= body.keys():
            raise RewardError(f"reward server at {self.url} sent a malformed /score answer (expected an object with "
                              f"rewards, toxicity and logits, got {_shape(body)})")
        rewards = self._numbers(body["rewards"], "rewards", n)
        toxicity = self._numbers(body["toxicity"], "toxicity", n)
        rows = body["logits"]
        if not isinstance(rows, list) or len(rows) != n or not all(isinstance(row, list) for row in rows):
            raise RewardError(f"reward server at {self.url} sent {_shape(rows)} as logits for {n} texts: expected "
                              "exactly one score per text, a list of numbers each")
        width = len(rows[0])
        if width == 0 or any(len(row) != width for row in rows):
            raise RewardError(f"reward server at {self.url} sent logits rows of {sorted({len(r) for r in rows})} "
                              "numbers: expected the same number (one per class, at least one) for every text")
        logits = [self._numbers(row, "logits", width, text=i) for i, row in enumerate(rows)]
        outside = [i for i, t in enumerate(toxicity) if not 0.0 <= t <= 1.0]
        if outside:
            raise RewardError(f"reward server at {self.url} sent toxicity {toxicity[outside[0]]} for text "
                              f"{outside[0]}: a toxicity is a probability in [0, 1]")
        return RewardScores(rewards=torch.tensor(rewards, dtype=torch.float32),
                            toxicity=torch.tensor(toxicity, dtype=torch.float32),
                            logits=torch.tensor(logits, dtype=torch.float32))

    def _numbers(self, values: Any, name: str, n: int, text: int | None = None) -> list[float]:
        """`values` as n finite floats, or one RewardError naming the field, the text and the value."""
        if not isinstance(values, list) or len(values) != n:
            raise RewardError(f"reward server at {self.url} sent {_shape(values)} as {name} for {n} texts: expected "
                              "exactly one score per text")
        floats = []
        for i, value in enumerate(values):
            where = f"text {i if text is None else text}"
            if type(value) not in (int, float):  # bool is an int to Python, and no score
                raise RewardError(f"reward server at {self.url} sent {value!r} in {name} for {where}: not a number")
            try:
                number = float(value)
            except OverflowError:  # an integer beyond any float
                number = math.inf
            # float32 is what the scores become: beyond its range is as broken as inf.
            if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
                raise RewardError(f"reward server at {self.url} sent a non-finite value in {name} "
                                  f"({_short(value)} for {where})")
            floats.append(number)
        return floats

    def score_pairs(self, prompts: Sequence[str], summaries: Sequence[str], mode: str = "prompt_and_summary") -> RewardScores:
        return self.score(scored_texts(prompts, summaries, mode))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _name_unknown(exc: BaseException) -> bool:
    """Whether a connection error comes from a host name the resolver says does not exist."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, socket.gaierror) and cause.errno in _NO_SUCH_HOST:
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _shape(value: Any) -> str:
    return f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


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
    except (ValueError, AttributeError, RecursionError):
        detail = response.text
    return str(detail)[:500] or "(empty body)"


def total_backoff_s(max_retries: int, backoff_s: float) -> float:
    """Seconds a client sleeps in all before giving up on a dead server (plus its connection attempts)."""
    return math.fsum(backoff_s * 2**i for i in range(max_retries))
