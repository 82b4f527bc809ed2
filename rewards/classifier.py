"""Loading the hate-speech classifier that produces rewards, and the small lookups around it.

Labels are always found by NAME in the classifier's `id2label` (never a hard-coded index), the device and dtype
come from `RewardConfig`, and every failure (missing directory, unreachable hub, wrong labels, bad device) is one
`RewardError` with a message saying what to fix.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from rewards.config import RewardConfig
from rewards.errors import RewardError
from rewards.hub import hub_access
from rewards.sources import DTYPES, is_hub_id

# Model types whose position ids start after the padding index (fairseq heritage), so the usable length is
# max_position_embeddings - (pad_token_id + 1): 512 - 2 = 510 for RoBERTa, although its config says 514.
_OFFSET_POSITION_MODELS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer"}

# Some tokenizers report int(1e30) as model_max_length when they do not know their limit.
_SENTINEL_MAX_LENGTH = 1_000_000


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise RewardError(f"reward dtype {name!r} is not supported: use one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_device(spec: str) -> torch.device:
    """'auto' -> this process's own GPU when one is visible (by LOCAL_RANK, as launchers set it: never GPU 0 for
    every process), else cpu; explicit devices ('cpu', 'cuda:7') are checked to exist."""
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # One visible GPU (e.g. a launcher that binds one per process) is this process's own.
        spec = "cuda:0" if torch.cuda.device_count() == 1 else f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise RewardError(f"reward device {spec!r} is not a valid torch device (use 'auto', 'cpu' or 'cuda:N')") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RewardError(f"reward device {spec!r} asks for CUDA but no GPU is visible: use 'cpu' or 'auto'")
        index = device.index if device.index is not None else 0
        if index >= torch.cuda.device_count():
            raise RewardError(
                f"reward device {spec!r} does not exist: only {torch.cuda.device_count()} GPU(s) are visible "
                "(check CUDA_VISIBLE_DEVICES)"
            )
    return device


def label_index(model_config: Any, name: str, role: str = "label", key: str = "reward") -> int:
    """Index of the class called `name` in the classifier's id2label; `key` is the config section named in errors
    (e.g. "reward" or "eval.judges[0]")."""
    id2label = {int(i): str(label) for i, label in getattr(model_config, "id2label", {}).items()}
    matches = [i for i, label in id2label.items() if label == name]
    if len(matches) != 1:
        source = getattr(model_config, "_name_or_path", "") or "the classifier"
        raise RewardError(
            f"the classifier {source} has no single class named {name!r} ({key}.{role}); its labels are "
            f"{[id2label[i] for i in sorted(id2label)]}: set {key}.{role} to one of them"
        )
    return matches[0]


def classifier_max_length(model_config: Any, tokenizer: Any, requested: int | None = None) -> int:
    """The longest input the classifier accepts, optionally lowered by `requested` (cfg.max_length)."""
    limits = []
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < _SENTINEL_MAX_LENGTH:
        limits.append(tokenizer_limit)
    positions = getattr(model_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        if getattr(model_config, "model_type", None) in _OFFSET_POSITION_MODELS:
            positions -= (getattr(model_config, "pad_token_id", None) or 0) + 1
        limits.append(positions)
    if not limits:
        raise RewardError("cannot tell the reward classifier's maximum input length: set reward.max_length")
    model_limit = min(limits)
    if requested is None:
        return model_limit
    if not 0 < requested <= model_limit:
        raise RewardError(f"reward.max_length={requested} is outside 1..{model_limit}, the classifier's limit")
    return requested


def check_classifier_head(model: Any, missing_keys: Any, source: str, key: str = "reward") -> None:
    """Refuse a checkpoint whose weights transformers had to initialise at random (its `missing_keys`): without a
    trained classification head the rewards are noise, and training on them would still run to the end."""
    missing = sorted(str(key) for key in missing_keys or ())
    if not missing:
        return
    prefix = f"{getattr(model, 'base_model_prefix', '') or '?'}."
    head = [key for key in missing if not key.startswith(prefix)]
    architectures = getattr(model.config, "architectures", None) or ["unknown"]
    if head:
        raise RewardError(
            f"classifier {source!r} ({key}) has no trained classification head (missing {', '.join(head[:4])}; its "
            f"architecture is {', '.join(map(str, architectures))}): it is a base encoder or another task's model, "
            f"not a fine-tuned text classifier. Point {key}.model_name_or_path at a sequence-classification "
            "checkpoint such as facebook/roberta-hate-speech-dynabench-r4-target"
        )
    raise RewardError(
        f"classifier {source!r} ({key}) lacks {len(missing)} weight(s) of its encoder ({', '.join(missing[:4])}): the "
        "checkpoint is incomplete; download it again"
    )


def check_classifier_source(name_or_path: str, key: str = "reward") -> None:
    """A local directory that exists, or something shaped like a hub id; else one RewardError naming `key`."""
    if Path(name_or_path).expanduser().exists():
        return
    if not is_hub_id(name_or_path):
        raise RewardError(
            f"{key}.model_name_or_path {name_or_path!r} does not exist (and is not a hub id): point it at a local "
            "classifier directory with config.json, model.safetensors and the tokenizer"
        )


def load_reward_classifier(cfg: RewardConfig, key: str = "reward") -> tuple[Any, Any]:
    """Load (model, tokenizer) in eval mode on cfg.device with cfg.dtype, after checking its labels; errors name the
    config section `key` ("reward", or a judge's "eval.judges[i]")."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = cfg.model_name_or_path
    check_classifier_source(source, key)
    dtype = resolve_dtype(cfg.dtype)
    device = resolve_device(cfg.device)
    local = Path(source).expanduser().exists()
    # Passed only when set: transformers finds the safetensors conversion of a hub model that has only
    # pytorch_model.bin on its default branch, but not when it is given revision=None.
    revision = {"revision": cfg.revision} if cfg.revision else {}
    # transformers logs a table of missing keys (check_classifier_head below says it in one line) and, on one
    # device, a list of "layers not sharded": neither helps, so its warnings are off while the weights load.
    load_logger = logging.getLogger("transformers")
    level = load_logger.level
    load_logger.setLevel(logging.ERROR)
    try:
        # A hub id on an offline machine: the cached copy, or one line at once instead of a minute of retries.
        what = "reward model" if key == "reward" else f"classifier of {key}"
        with hub_access(source, what, f"set {key}.model_name_or_path to DIR", RewardError):
            tokenizer = AutoTokenizer.from_pretrained(
                str(Path(source).expanduser()) if local else source, trust_remote_code=cfg.trust_remote_code,
                **revision,
            )
            model, loading_info = AutoModelForSequenceClassification.from_pretrained(
                str(Path(source).expanduser()) if local else source,
                **revision,
                use_safetensors=True,
                trust_remote_code=cfg.trust_remote_code,
                dtype=dtype,
                output_loading_info=True,
            )
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: weights of the wrong shape
        where = "local directory" if local else "hub id (no local copy in the cache, and the hub is unreachable?)"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RewardError(
            f"cannot load the classifier of {key} from {where} {source!r}: {first_line}. "
            f"Download it once and point {key}.model_name_or_path at the local directory"
        ) from exc
    finally:
        load_logger.setLevel(level)
    # Before the labels: a base encoder's config may carry LABEL_0/LABEL_1, and matching them would score with a
    # random head.
    check_classifier_head(model, loading_info.get("missing_keys", ()), source, key)
    label_index(model.config, cfg.toxic_label, "toxic_label", key)  # first: a judge's reward_label is its toxic_label
    label_index(model.config, cfg.reward_label, "reward_label", key)
    if tokenizer.pad_token is None:
        # Batched scoring needs padding; the attention mask hides whichever token fills the gaps.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise RewardError(f"the reward tokenizer of {source!r} has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback
    return model.to(device).eval(), tokenizer
