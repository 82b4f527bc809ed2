"""Shared test fixtures: the repository root, the offline tiny artifacts and the shared DialogSum copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train.tiny_models import TinyArtifacts, build_tiny_artifacts

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIALOGSUM = REPO_ROOT.parent / "shared" / "data" / "dialogsum"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_artifacts() -> TinyArtifacts:
    """The tiny models and synthetic data under <repo>/artifacts/tiny, built once and then reused via the stamp."""
    return build_tiny_artifacts(REPO_ROOT / "artifacts" / "tiny")


@pytest.fixture(scope="session")
def shared_dialogsum() -> Path:
    """The real DialogSum (cylnlp JSONL layout) next to the repository; CI always has it, so missing is a failure."""
    if not SHARED_DIALOGSUM.is_dir():
        pytest.fail(f"shared DialogSum data not found at {SHARED_DIALOGSUM}: it must sit next to the repository "
                    f"as ../shared/data/dialogsum (dialogsum.{{train,dev,test}}.jsonl)")
    return SHARED_DIALOGSUM


@pytest.fixture
def one_torch_thread():
    """The tiny models gain nothing from intra-op threads, and on a busy 2-core machine they lose 10x to contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
