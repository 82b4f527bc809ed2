"""In-process reward scoring: texts in, per-text logits, rewards and toxicity out.

The reward of a text is the raw logit of the `reward_label` class ("nothate", as in the original notebook) and
its toxicity is the probability of the `toxic_label` class ("hate"): the softmax over the classes for a
single-label head, the sigmoid of the class's own logit for a multi-label one (`reward.toxicity_activation`). Both
classes are looked up by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from rewards.classifier import classifier_max_length, label_index, load_reward_classifier
from rewards.config import RewardConfig
from rewards.errors import RewardError

TEXT_MODES = ("prompt_and_summary", "summary")
# A lone UTF-16 surrogate is a legal JSON escape ("\\ud800") and a legal Python character, but no UTF-8 text: the
# tokenizer and the HTTP client both fail on it. Searched for, rather than encoded, to allocate nothing.
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> int | None:
    """The position of the first character of `text` that UTF-8 cannot encode (a lone surrogate), or None."""
    found = _SURROGATE.search(text)
    return None if found is None else found.start()


@dataclass
class RewardScores:
    """Scores of N texts, float32 on the CPU: rewards [N], toxicity [N], logits [N, C] (C = classifier classes)."""

    rewards: torch.Tensor
    toxicity: torch.Tensor
    logits: torch.Tensor

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    def to_lists(self) -> dict[str, list]:
        return {"rewards": self.rewards.tolist(), "toxicity": self.toxicity.tolist(), "logits": self.logits.tolist()}

    @classmethod
    def concat(cls, parts: Sequence["RewardScores"]) -> "RewardScores":
        widths = sorted({int(p.logits.shape[1]) for p in parts})
        if len(widths) > 1:
            raise RewardError(f"cannot join scores with {widths} logit columns: they come from different classifiers")
        return cls(
            rewards=torch.cat([p.rewards for p in parts]),
            toxicity=torch.cat([p.toxicity for p in parts]),
            logits=torch.cat([p.logits for p in parts]),
        )

    def slice(self, start: int, stop: int) -> "RewardScores":
        return RewardScores(self.rewards[start:stop], self.toxicity[start:stop], self.logits[start:stop])


def scores_from_logits(logits: torch.Tensor, reward_index: int, toxic_index: int, sigmoid: bool = False) -> RewardScores:
    """(rows, classes) logits -> rewards (the reward class's logit) and toxicity (the toxic class's probability:
    its sigmoid for a multi-label head, else the softmax over the classes)."""
    logits = logits.float()
    toxic = torch.sigmoid(logits[:, toxic_index]) if sigmoid else torch.softmax(logits, dim=-1)[:, toxic_index]
    return RewardScores(rewards=logits[:, reward_index].clone(), toxicity=toxic.clone(), logits=logits)


def uses_sigmoid(model_config: Any, activation: str) -> bool:
    """Whether toxicity is a sigmoid (multi-label head) rather than a softmax; "auto" asks the model's config."""
    if activation not in ("auto", "softmax", "sigmoid"):
        raise RewardError(f"reward.toxicity_activation must be auto, softmax or sigmoid, got {activation!r}")
    if activation == "auto":
        return getattr(model_config, "problem_type", None) == "multi_label_classification"
    return activation == "sigmoid"


def scored_texts(prompts: Sequence[str], summaries: Sequence[str], mode: str) -> list[str]:
    """The texts the classifier sees: prompt + summary (the notebook's `q + r`) or the summary alone."""
    if len(prompts) != len(summaries):
        raise RewardError(f"got {len(prompts)} prompts but {len(summaries)} summaries to score")
    if mode == "prompt_and_summary":
        return [prompt + summary for prompt, summary in zip(prompts, summaries)]
    if mode == "summary":
        return list(summaries)
    raise RewardError(f"reward.text={mode!r} is not one of {list(TEXT_MODES)}")


def check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise RewardError("score() takes a list of texts, not a single string: wrap it as [text]")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise RewardError(f"texts to score must be strings; item(s) {bad[:5]} are {type(texts[bad[0]]).__name__}")
    for i, text in enumerate(texts):
        if (at := lone_surrogate(text)) is not None:
            raise RewardError(f"text {i} is not valid Unicode: character {at} is a lone surrogate "
                              f"({text[at]!r}), which UTF-8 cannot encode; clean the text before scoring it")
    return texts


class RewardScorer:
    """A loaded classifier that scores texts in batches on its own device."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        reward_label: str = "nothate",
        toxic_label: str = "hate",
        batch_size: int = 64,
        max_length: int | None = None,
        name: str = "",
        toxicity_activation: str = "auto",
    ) -> None:
        if batch_size < 1:
            raise RewardError(f"reward batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.reward_label = reward_label
        self.toxic_label = toxic_label
        self.reward_index = label_index(model.config, reward_label, "reward_label")
        self.toxic_index = label_index(model.config, toxic_label, "toxic_label")
        self.sigmoid = uses_sigmoid(model.config, toxicity_activation)
        self.batch_size = batch_size
        self.max_length = classifier_max_length(model.config, tokenizer, max_length)
        # Over-long texts lose their beginning, not their end: in "prompt_and_summary" mode the summary (what
        # the policy wrote, and what the reward is about) comes last and must always be scored.
        self.tokenizer.truncation_side = "left"
        self.name = name or str(getattr(model.config, "_name_or_path", ""))
        self.device = next(model.parameters()).device

    @classmethod
    def from_config(cls, cfg: RewardConfig, key: str = "reward") -> "RewardScorer":
        """Load cfg's classifier; errors name the config section `key`."""
        model, tokenizer = load_reward_classifier(cfg, key)
        return cls(
            model,
            tokenizer,
            reward_label=cfg.reward_label,
            toxic_label=cfg.toxic_label,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            name=cfg.model_name_or_path,
            toxicity_activation=cfg.toxicity_activation,
        )

    @property
    def labels(self) -> dict[int, str]:
        return {int(i): str(label) for i, label in self.model.config.id2label.items()}

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "labels": self.labels, "device": str(self.device), "max_length": self.max_length,
                "toxicity": "sigmoid" if self.sigmoid else "softmax"}

    @torch.inference_mode()
    def score(self, texts: Sequence[str]) -> RewardScores:
        texts = check_texts(texts)
        num_classes = len(self.labels)
        if not texts:
            empty = torch.zeros(0)
            return RewardScores(empty, empty.clone(), torch.zeros(0, num_classes))
        # Longest-first batches pad less; the original order is restored at the end.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        logits = torch.empty(len(texts), num_classes)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            batch = self.tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            logits[rows] = self.model(**batch).logits.float().cpu()
        return scores_from_logits(logits, self.reward_index, self.toxic_index, self.sigmoid)

    def score_pairs(self, prompts: Sequence[str], summaries: Sequence[str], mode: str = "prompt_and_summary") -> RewardScores:
        return self.score(scored_texts(prompts, summaries, mode))

    def close(self) -> None:
        """Nothing to release; here so a scorer and a RewardClient are interchangeable."""
