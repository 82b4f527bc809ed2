"""Fixtures for every test directory: the repository root, the offline tiny artifacts, the shared DialogSum copy,
one torch thread, and the SFT run that the SFT, merge and evaluation tests share.

tests/ mirrors the packages: the tests of `<package>/<module>.py` are in `tests/<package>/test_<module>.py`
(tests/eval/human/test_main.py for eval/human/__main__.py; a module without such a file has no tests of its own and
is exercised through the modules that use it); the scripts of slurm/ and bench/ have theirs in
tests/slurm and tests/bench, and tests/test_*.py hold the repository-wide rules.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train.tiny_models import TinyArtifacts, build_tiny_artifacts

pytest.register_assert_rewrite("helpers")  # before the import: its asserts report like the tests' own
from helpers import REPO_ROOT, SHARED_DIALOGSUM, build_tiny_classifier, sft_args  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave the `extended` variants out of a plain run; a -m expression or a test named by its id decides alone."""
    if config.option.markexpr or any("::" in arg for arg in config.args):
        return
    extended = [item for item in items if item.get_closest_marker("extended")]
    if extended:
        config.hook.pytest_deselected(items=extended)
        items[:] = [item for item in items if not item.get_closest_marker("extended")]


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


@pytest.fixture
def compiled_decoding(monkeypatch):
    """A clean slate for torch.compile, dropped again afterwards; transformers' compile sets TOKENIZERS_PARALLELISM,
    which must not leak into later tests."""
    import os

    from torch._dynamo.utils import counters

    if "TOKENIZERS_PARALLELISM" in os.environ:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", os.environ["TOKENIZERS_PARALLELISM"])
    else:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def trained(tiny_artifacts, repo_root, tmp_path_factory) -> Path:
    """One single-process SFT run (40 steps) shared by tests/train/test_sft.py, test_merge_adapter.py and
    tests/eval/test_evaluate.py; returns its output_dir."""
    from train import sft

    out = tmp_path_factory.mktemp("sft_run")
    sft.main(sft_args(repo_root, tiny_artifacts, out, "--sft.max_steps", "40", "--sft.eval_every_steps", "20",
                      "--sft.save_every_steps", "20"))
    return out


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """A hub endpoint that refuses connections at once (port 9 of this machine) and empty hub and datasets caches
    (`.hub_cache`, `.datasets_cache`): tests of hub ids stay offline and fast whatever the machine's network."""
    from types import SimpleNamespace

    import datasets
    import huggingface_hub.constants

    from rewards import hub

    caches = SimpleNamespace(hub_cache=tmp_path / "hub-cache", datasets_cache=tmp_path / "datasets-cache")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(caches.hub_cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", caches.datasets_cache)
    hub._probe.cache_clear()
    yield caches
    hub._probe.cache_clear()


@pytest.fixture(scope="session")
def three_label_classifiers(tmp_path_factory):
    """(multi-label, single-label) tiny classifiers with the classes toxic, insult, threat: the same weights, one
    config saying problem_type multi_label_classification (as unitary/toxic-bert's does)."""
    labels = {0: "toxic", 1: "insult", 2: "threat"}
    multi = build_tiny_classifier(tmp_path_factory.mktemp("multi"), labels)
    config = json.loads((multi / "config.json").read_text())
    (multi / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    return multi, build_tiny_classifier(tmp_path_factory.mktemp("single"), labels)
