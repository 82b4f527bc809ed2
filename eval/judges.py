"""Held-out toxicity judges: classifiers the evaluation measures with that PPO was not trained against.

PPO maximises the reward model's score, so the reward model's own toxicity can fall because the policy found its
blind spots rather than because the summaries became less toxic. Every summary is therefore also scored by each
judge of `eval.judges` (e.g. tomh/toxigen_roberta, label LABEL_1; unitary/toxic-bert, label toxic, sigmoid). A judge
is placed like the reward model: in this process on `device`, or behind a reward server at `url` serving it.

    judges = load_judges(cfg.eval.judges, cfg.reward, device)
    toxicity = judges[0].toxicity(prompts, summaries)   # [len(summaries)] probabilities of the toxic class

`check_judges_before_loading` finds a missing directory or a wrong label from the judge's config.json alone, before
any model loads; hub ids and servers are checked when they load. A judge behind a reward server scores batches the
server may join with other processes' requests, so its scores can differ from an in-process judge's by float rounding
between 1 and N processes.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Sequence

from rewards.classifier import check_classifier_source, label_index
from rewards.config import RewardConfig
from rewards.errors import RewardError
from rewards.hub import hub_access
from rewards.scorer import scored_texts, scores_from_logits
from train.config import JudgeConfig, judge_name

if TYPE_CHECKING:
    import torch


def judge_key(index: int) -> str:
    return f"eval.judges[{index}]"


def judge_reward_config(judge: JudgeConfig, reward: RewardConfig, device: str) -> RewardConfig:
    """The judge as a RewardConfig the reward loaders take. A judge gives no reward, but the scorer needs a reward
    class: its toxic class stands in (its logit is never read)."""
    return dataclasses.replace(
        reward, model_name_or_path=judge.model_name_or_path, revision=judge.revision, reward_label=judge.toxic_label,
        toxic_label=judge.toxic_label, toxicity_activation=judge.toxicity_activation,
        text=judge.text, device=device, dtype=judge.dtype, batch_size=judge.batch_size,
        max_length=judge.max_length, url=judge.url, token_env=judge.token_env,
        trust_remote_code=judge.trust_remote_code,
    )


def check_judges_before_loading(judges: Sequence[JudgeConfig]) -> None:
    """Each local judge directory exists and its config.json has the toxic label; RewardError naming the key."""
    from transformers import AutoConfig

    for i, judge in enumerate(judges):
        if judge.url:
            continue  # the server's labels are checked when it answers /health
        key = judge_key(i)
        check_classifier_source(judge.model_name_or_path, key)
        path = Path(judge.model_name_or_path).expanduser()
        if not path.exists():
            continue  # a hub id: checked when it loads
        try:
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=judge.trust_remote_code)
        except (OSError, ValueError) as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RewardError(f"{key}.model_name_or_path {str(path)!r} is not a classifier directory (config.json "
                              f"unreadable: {first_line})") from exc
        label_index(config, judge.toxic_label, "toxic_label", key)


def check_judges_available(judges: Sequence[JudgeConfig]) -> None:
    """check_judges_before_loading, and every hub-id judge cached or the hub reachable: a long pipeline stops before
    training rather than at its evaluation."""
    check_judges_before_loading(judges)
    for i, judge in enumerate(judges):
        if not judge.url:
            with hub_access(judge.model_name_or_path, f"classifier of {judge_key(i)}",
                            f"set {judge_key(i)}.model_name_or_path to DIR", RewardError):
                pass


@dataclasses.dataclass
class Judge:
    """A loaded judge: `toxicity(prompts, summaries)` -> the probability of its toxic class per summary."""

    name: str
    backend: Any  # a rewards.scorer.RewardScorer or a rewards.client.RewardClient: both score(texts) -> RewardScores
    text_mode: str
    toxic_index: int
    sigmoid: bool
    where: str

    def toxicity(self, prompts: Sequence[str], summaries: Sequence[str]) -> list[float]:
        logits = self.backend.score(scored_texts(prompts, summaries, self.text_mode)).logits
        return scores_from_logits(logits, self.toxic_index, self.toxic_index, self.sigmoid).toxicity.tolist()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "where": self.where, "text": self.text_mode,
                "toxicity": "sigmoid" if self.sigmoid else "softmax"}

    def close(self) -> None:
        self.backend.close()


def load_judge(index: int, judge: JudgeConfig, reward: RewardConfig, device: torch.device) -> Judge:
    """Judge `index` of eval.judges: in this process ("auto" = `device`, this process's own) or at its url."""
    key = judge_key(index)
    placement = str(device) if judge.device == "auto" else judge.device
    cfg = judge_reward_config(judge, reward, placement)
    if cfg.url:
        from rewards.client import RewardClient

        client = RewardClient(cfg.url, token=os.environ.get(cfg.token_env) or None, timeout_s=cfg.timeout_s,
                              max_retries=cfg.max_retries)
        try:
            health = client.health()
            labels = health.get("labels") if isinstance(health, dict) else None
            if not isinstance(labels, dict):
                raise RewardError(f"the reward server at {cfg.url} ({key}) does not say which classes its classifier "
                                  f"has (its /health shows them to token holders): set its token in ${cfg.token_env} "
                                  f"({key}.token_env)")
            served = SimpleNamespace(id2label=labels, _name_or_path=str(health.get("model", cfg.url)))
            toxic_index = label_index(served, judge.toxic_label, "toxic_label", key)
        except BaseException:
            client.close()
            raise
        activation = judge.toxicity_activation
        sigmoid = health.get("toxicity") == "sigmoid" if activation == "auto" else activation == "sigmoid"
        return Judge(judge_name(judge), client, cfg.text, toxic_index, sigmoid, f"server {cfg.url}")
    from rewards.scorer import RewardScorer

    scorer = RewardScorer.from_config(cfg, key=key)
    return Judge(judge_name(judge), scorer, cfg.text, scorer.toxic_index, scorer.sigmoid, f"in-process on {scorer.device}")


def load_judges(judges: Sequence[JudgeConfig], reward: RewardConfig, device: torch.device) -> list[Judge]:
    loaded: list[Judge] = []
    try:
        for i, judge in enumerate(judges):
            loaded.append(load_judge(i, judge, reward, device))
    except BaseException:
        close_judges(loaded)
        raise
    return loaded


def close_judges(judges: Sequence[Judge]) -> None:
    for judge in judges:
        judge.close()
