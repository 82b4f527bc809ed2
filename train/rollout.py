"""Experience making for PPO: prompts -> batched generation -> reward scores -> a typed `Rollout`.

Kept apart from the optimisation (`train/ppo_core.py`), as OpenRLHF keeps its experience maker apart from its
trainer. `train/ppo.py` calls, once per PPO step:

    rows = stream.next_rows()                                    # this process's shard of the global batch
    rollout, info = make_rollout(policy, tokenizer, prompts.select(rows), reward_fn, shaper, cfg, accelerator)

* `PromptStream`: a seeded order over the PPO prompts, one permutation per epoch; each step takes the next
  `ppo.batch_size` prompts and each process its disjoint slice of them. Its state (epoch, position) goes into
  checkpoints, so a resumed run continues with the next unseen prompts.
* `generate_responses`: `rollout.batch_size` prompts per `generate()` call with attention masks, the sampling
  settings of `cfg.rollout` (LengthSampler included); the decoder start token stays at position 0 and
  everything after the first eos becomes padding, masked out by `response_mask`.
* `score_responses`: the reward model on the decoded summaries; missing or non-finite scores stop the run.
* `ScoreShaper`: optional reward normalisation/clipping (`reward.normalize`/`reward.clip`, on the global batch so
  every process shapes alike) and TRL's score scaling (`ppo.score_scaling`/`score_clip`); state checkpointed.

Shapes: B = rows on this process, Q = prompt length, R = decoder length (start token included).
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

from rewards.errors import RewardError
from rewards.normalize import RewardNormalizer
from rewards.scorer import RewardScores
from train.config import ExperimentConfig, GenerationSettings
from train.errors import ConfigError, DataError
from train.generation import generation_kwargs
from train.ppo_core import Rollout, RunningMoments, response_mask_from_ids, scale_scores


@dataclass
class RolloutInfo:
    """What the loop logs about a rollout besides the `Rollout` itself (this process's rows)."""

    prompt_ids: list[str]  # dataset ids of the prompts
    summaries: list[str]  # decoded responses
    raw_rewards: torch.Tensor  # (B,) reward-model scores before any shaping
    toxicity: torch.Tensor  # (B,) probability of the toxic class
    response_lengths: torch.Tensor  # (B,) generated tokens (eos included, start token excluded)
    time_generate: float
    time_score: float


# ----------------------------------------------------------------------------------------------------
# Prompt order and data position


class PromptStream:
    """Seeded, resumable order over `num_prompts` prompts, sharded over processes.

    Epoch e uses the permutation `randperm(num_prompts, seed + e)`. A step takes the next `batch_size` (global)
    positions of it; process p takes its contiguous slice of `batch_size / num_processes`. A partial batch at
    the end of an epoch is skipped (like drop_last), so every step sees a full, fresh batch.
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int, process_index: int = 0, num_processes: int = 1):
        if batch_size % num_processes:
            raise ConfigError(
                f"ppo.batch_size ({batch_size}) must be a multiple of the number of processes ({num_processes})"
            )
        if num_prompts < batch_size:
            raise DataError(
                f"only {num_prompts} PPO training prompts for ppo.batch_size {batch_size}: "
                "raise data.max_examples or lower ppo.batch_size"
            )
        self.num_prompts, self.batch_size, self.seed = num_prompts, batch_size, seed
        self.process_index, self.num_processes = process_index, num_processes
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_prompts, generator=generator).tolist()

    def next_rows(self) -> list[int]:
        """Dataset rows for this process's share of the next global batch."""
        if self.position + self.batch_size > self.num_prompts:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        batch = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        local = self.batch_size // self.num_processes
        return batch[self.process_index * local : (self.process_index + 1) * local]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_prompts": self.num_prompts, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_prompts"] != self.num_prompts or state["seed"] != self.seed:
            raise ConfigError(
                f"the checkpoint was written for {state['num_prompts']} prompts with seed {state['seed']}, but this "
                f"run has {self.num_prompts} prompts with seed {self.seed}: resume with the same data and seed"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


# ----------------------------------------------------------------------------------------------------
# Generation


def _zero_stage(accelerator: Any) -> int:
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


@contextmanager
def unwrap_for_generation(model: Any, accelerator: Any = None) -> Iterator[Any]:
    """The bare policy to call `generate` on, in eval mode.

    Under DeepSpeed ZeRO-3 each process holds only a shard of every parameter; as TRL's
    `unwrap_model_for_generation` does, the full parameters are gathered once for the whole `generate()` call
    (with DeepSpeed's forward hooks removed meanwhile), rather than re-gathered layer by layer per token.
    """
    if accelerator is None:
        unwrapped = model
        engine_context = None
    else:
        unwrapped = accelerator.unwrap_model(model)
        engine_context = None
        if _zero_stage(accelerator) == 3:
            from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

            engine_context = unwrap_model_for_generation(model)
    was_training = unwrapped.training
    unwrapped.eval()  # no dropout while sampling
    try:
        if engine_context is None:
            yield unwrapped
        else:
            with engine_context:
                yield unwrapped
    finally:
        unwrapped.train(was_training)


def pad_right(rows: Sequence[torch.Tensor], pad_id: int, mask_rows: Optional[Sequence[torch.Tensor]] = None):
    """Right-pad 1-D id tensors to one (N, L) tensor; returns (ids, mask). `mask_rows` default to all ones."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1 if mask_rows is None else mask_rows[i]
    return ids, mask


@torch.no_grad()  # not inference_mode: the ids feed the PPO forward passes that are back-propagated
def generate_responses(
    model: Any,
    tokenizer: Any,
    query_ids: Sequence[Sequence[int]],
    settings: GenerationSettings,
    device: torch.device | str,
    rng: Optional[random.Random] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample a response for each prompt, `settings.batch_size` prompts per `generate()` call.

    Returns query_ids, query_mask (B, Q) and response_ids, response_mask (B, R), all right-padded and on `device`.
    response_ids[:, 0] is the decoder start token; every position after a row's first eos is padding (pad id,
    mask 0). `rng` draws max_new_tokens per call when `settings.max_new_tokens_min` is set.
    """
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    queries = [torch.tensor(q, dtype=torch.long) for q in query_ids]
    responses: list[torch.Tensor] = []
    response_masks: list[torch.Tensor] = []
    for start in range(0, len(queries), settings.batch_size):
        ids, mask = pad_right(queries[start : start + settings.batch_size], pad_id)
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), pad_token_id=pad_id, eos_token_id=eos_id,
            **generation_kwargs(settings, rng),
        ).cpu()
        out_mask = response_mask_from_ids(out, eos_id)
        out = out.masked_fill(out_mask == 0, pad_id)
        for row, row_mask in zip(out, out_mask):
            length = int(row_mask.sum())  # the mask is 1 on a prefix of each row
            responses.append(row[:length])
            response_masks.append(row_mask[:length])
    query_ids_t, query_mask = pad_right(queries, pad_id)
    response_ids, response_mask = pad_right(responses, pad_id)
    return query_ids_t.to(device), query_mask.to(device), response_ids.to(device), response_mask.to(device)


# ----------------------------------------------------------------------------------------------------
# Scoring and score shaping


def score_responses(reward_fn: Any, prompts: Sequence[str], summaries: Sequence[str]) -> RewardScores:
    """Reward-model scores of (prompt, summary) pairs; raises RewardError unless every score is present and finite."""
    scores = reward_fn(list(prompts), list(summaries))
    if len(scores) != len(summaries):
        raise RewardError(
            f"the reward model returned {len(scores)} scores for {len(summaries)} summaries; "
            "check the reward server (reward.url) or classifier"
        )
    bad = (~torch.isfinite(scores.rewards)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(
            f"the reward model returned non-finite scores for {len(bad)} of {len(summaries)} summaries "
            f"(e.g. {summaries[bad[0]]!r}); check reward.model_name_or_path and reward.dtype"
        )
    return scores


def gather_rows(tensor: torch.Tensor, accelerator: Any) -> torch.Tensor:
    """Concatenate every process's (N, ...) tensor along dim 0, in rank order (equal N on every process).

    `torch.distributed.all_gather` into a list rather than `accelerator.gather`: under DeepSpeed on CPU the latter
    takes the all_gather_into_tensor path, which gloo rejects.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(accelerator.num_processes)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class ScoreShaper:
    """Optional transforms from raw reward-model scores to the PPO scores, with state for checkpoints.

    First `reward.normalize`/`reward.clip` (RewardNormalizer), updated with the GLOBAL batch so every process
    keeps the same statistics; then TRL's `ppo.score_scaling`/`score_norm`/`score_clip` (ppo_core.scale_scores).
    """

    def __init__(self, cfg: ExperimentConfig):
        self.normalizer = RewardNormalizer.from_config(cfg.reward)
        self.running = RunningMoments()
        self.ppo_cfg = cfg.ppo

    def __call__(self, raw: torch.Tensor, accelerator: Any = None) -> torch.Tensor:
        """(B,) raw scores of this process -> (B,) shaped scores."""
        scores = raw.float()
        if self.normalizer.normalize or self.normalizer.clip is not None:
            if accelerator is not None and accelerator.num_processes > 1:
                everyone = gather_rows(scores.to(accelerator.device), accelerator).cpu()
                shaped = self.normalizer(everyone)
                rank, local = accelerator.process_index, len(scores)
                scores = shaped[rank * local : (rank + 1) * local]
            else:
                scores = self.normalizer(scores)
        return scale_scores(scores, self.ppo_cfg, self.running, accelerator)

    def state_dict(self) -> dict[str, Any]:
        return {"normalizer": self.normalizer.state_dict(), "running_moments": self.running.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.normalizer.load_state_dict(state["normalizer"])
        self.running.load_state_dict(state["running_moments"])


# ----------------------------------------------------------------------------------------------------
# One rollout


def make_rollout(
    policy: Any,
    tokenizer: Any,
    prompts: Any,
    reward_fn: Any,
    shaper: ScoreShaper,
    cfg: ExperimentConfig,
    accelerator: Any = None,
    rng: Optional[random.Random] = None,
) -> tuple[Rollout, RolloutInfo]:
    """Generate, decode and score this process's prompts (rows of the PPO dataset: input_ids, query, id).

    The classifier sees the dataset's `query` (the decoded prompt) and the summary, as the reference notebook did.
    """
    device = accelerator.device if accelerator is not None else next(policy.parameters()).device
    started = time.perf_counter()
    with unwrap_for_generation(policy, accelerator) as model:
        query_ids, query_mask, response_ids, response_mask = generate_responses(
            model, tokenizer, prompts["input_ids"], cfg.rollout, device, rng
        )
    summaries = [s.strip() for s in tokenizer.batch_decode(response_ids, skip_special_tokens=True)]
    time_generate = time.perf_counter() - started

    started = time.perf_counter()
    scores = score_responses(reward_fn, prompts["query"], summaries)
    shaped = shaper(scores.rewards, accelerator)
    time_score = time.perf_counter() - started

    rollout = Rollout(query_ids, query_mask, response_ids, response_mask, shaped.to(device))
    info = RolloutInfo(
        prompt_ids=list(prompts["id"]),
        summaries=summaries,
        raw_rewards=scores.rewards.float(),
        toxicity=scores.toxicity.float(),
        response_lengths=(response_mask.sum(dim=1) - 1).float().cpu(),
        time_generate=time_generate,
        time_score=time_score,
    )
    return rollout, info


__all__ = [
    "PromptStream",
    "RolloutInfo",
    "ScoreShaper",
    "gather_rows",
    "generate_responses",
    "make_rollout",
    "pad_right",
    "score_responses",
    "unwrap_for_generation",
]
