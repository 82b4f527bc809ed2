"""Hub ids on a machine that may be offline: one quick answer instead of a minute of retries.

Asked for a hub id, the Hugging Face libraries retry an unreachable hub for about a minute, logging every attempt,
before saying they could not connect, and they do so even when the files are in the local cache. `hub_access`
decides first: a local directory or a reachable hub changes nothing; a copy in the local cache is loaded with the
libraries in offline mode (no requests, so no retries); anything else is one error line naming the id and how to
get it.

Lives in `rewards/`, the bottom of the import order (eval -> train -> rewards), so the reward classifier and the
training side share it.
"""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from rewards.errors import DetoxSumError
from rewards.sources import is_hub_id

# Long enough for a slow but working link, short enough that a black-holed network fails in seconds.
PROBE_TIMEOUT_S = 5.0


def hub_unavailable_reason() -> Optional[str]:
    """None when the hub answers; otherwise why it cannot be used (offline mode, connection error)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return _probe(constants.ENDPOINT, PROBE_TIMEOUT_S)


@functools.lru_cache(maxsize=None)
def _probe(endpoint: str, timeout: float) -> Optional[str]:
    """One request, no retries; cached per endpoint so loading a tokenizer and then a model probes once."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=timeout)  # any HTTP answer, even an error status, means reachable
    except Exception as e:  # refused, DNS failure, timeout, proxy or URL errors: all mean the hub is not usable here
        text = str(e).strip()
        return f"{endpoint}: {text.splitlines()[0] if text else type(e).__name__}"
    return None


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def in_hub_cache(repo_id: str, repo_type: str = "model") -> bool:
    """Whether the local hub cache holds at least one snapshot of `repo_id`."""
    from huggingface_hub.file_download import repo_folder_name

    snapshots = hub_cache_dir() / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


@contextmanager
def offline_mode() -> Iterator[None]:
    """The hub libraries read only the local cache inside: they make no requests, so nothing waits on retries."""
    from huggingface_hub import constants

    # transformers and peft ask huggingface_hub at call time; datasets keeps its own copy of the flag.
    holders = [constants] + [m for m in (sys.modules.get("datasets.config"),) if m is not None]
    saved = [m.HF_HUB_OFFLINE for m in holders]
    for m in holders:
        m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m, value in zip(holders, saved):
            m.HF_HUB_OFFLINE = value


def unavailable_message(name: str, what: str, reason: str, fix: str, repo_type: str = "model") -> str:
    flag = "" if repo_type == "model" else f" --repo-type {repo_type}"
    return (
        f"{what} {name!r} is neither a local directory nor in the Hugging Face cache ({hub_cache_dir()}), and the "
        f"hub cannot be reached ({reason}). On a machine with internet run `hf download {name}{flag} --local-dir DIR`, "
        f"copy DIR here and {fix}"
    )


@contextmanager
def hub_access(
    name: str,
    what: str,
    fix: str,
    error: Callable[[str], Exception] = DetoxSumError,
    repo_type: str = "model",
    other_caches: Sequence[Path] = (),
) -> Iterator[None]:
    """Wrap the loading of `name` (a local path or a hub id).

    A local path, or a hub id while the hub answers: the body runs as it is. A hub id the hub cannot serve: the body
    runs in offline mode if the hub cache (or one of `other_caches`, e.g. the datasets cache) holds it; otherwise
    `error` is raised at once with one line saying what `what` is missing and to `fix` it (e.g. "pass
    --model.name_or_path DIR").
    """
    if not is_hub_id(name) or Path(name).expanduser().exists():
        yield
        return
    reason = hub_unavailable_reason()
    if reason is None:
        yield
        return
    if not (in_hub_cache(name, repo_type) or any(Path(c).exists() for c in other_caches)):
        raise error(unavailable_message(name, what, reason, fix, repo_type))
    with offline_mode():
        yield
