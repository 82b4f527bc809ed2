"""Experience making for PPO: prompts -> batched generation -> reward scores -> no-grad forward passes -> one typed
`Trajectory` (train/ppo_core.py), gathered from every process into the global batch.

`train/ppo.py` calls, once per PPO step:

    rows = stream.next_rows()                                         # this process's shard of the global batch
    local, info = make_experience(policy, tokenizer, prompts.select(rows), reward_fn, cfg, accelerator, rng)
    trajectory = gather_trajectory(local, collectives, tokenizer.pad_token_id)

* `PromptStream`: a seeded order over the PPO prompts, one permutation per epoch; each step takes the next
  `ppo.batch_size` prompts and each process its contiguous slice of them, so the gathered rows are in the order a
  single process would have had. Its state (epoch, position) goes into checkpoints.
* `encode_prompts`: the policy's encoder on the prompts, once per prompt: `generate()` and the old log-probs and
  values all start from it, so none runs the encoder again (on prompts several times longer than the summaries, the
  encoder is most of a forward pass). With k = rollout.samples_per_prompt > 1 the adapter-off reference's encoder
  also runs once per prompt, not once per row.
* `generate_responses`: `rollout.batch_size` prompts per `generate()` call with attention masks, the sampling
  settings of `cfg.rollout` (LengthSampler included); the decoder start token stays at position 0 and
  everything after the first eos becomes padding, masked out by `response_mask`.
* `score_responses`: the reward model on the decoded summaries; missing or non-finite scores stop the run.
* `forward_trajectory`: old log-probs and values of the policy (its decoder on the encoded prompts) and the KL
  reference's log-probs (its decoder on its encoded prompts, or its own encoder too), in no-grad chunks of `ppo.forward_batch_size` rows, dropout
  off; each chunk trimmed to its own padding.

Shapes: B = rows on this process, Q = prompt length, R = decoder length (start token included), T = R - 1,
d = the model width.
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from rewards.errors import RewardError
from rewards.scorer import RewardScores
from train.config import ExperimentConfig, GenerationSettings
from train.distributed import Collectives, zero_stage
from train.errors import ConfigError, DataError
from train.generation import compiled_decoding_kwargs, decode_compiled, generation_config_extras, generation_kwargs
from train.models import adapter_merged, merges_for_rollout
from train.ppo_core import Trajectory, logprobs_from_logits, response_loss_mask, response_mask_from_ids

log = logging.getLogger("train.ppo")


@dataclass
class RolloutInfo:
    """What the loop logs about a rollout besides its `Trajectory` (this process's rows)."""

    prompt_ids: list[str]  # dataset ids of the rows' prompts (each k times: rollout.samples_per_prompt)
    summaries: list[str]  # decoded responses
    toxicity: torch.Tensor  # (B,) probability of the toxic class
    response_lengths: torch.Tensor  # (B,) generated tokens (eos included, start token excluded)
    time_generate: float
    time_score: float
    time_forward: float  # the no-grad forward passes


# ----------------------------------------------------------------------------------------------------
# Prompt order and data position


class PromptStream:
    """Seeded, resumable order over `num_prompts` prompts, sharded over processes.

    Epoch e uses the permutation `randperm(num_prompts, seed + e)`. A step takes the next `batch_size` (global prompts:
    ppo.batch_size / rollout.samples_per_prompt) positions of it; process p takes its contiguous slice of `batch_size / num_processes`. A partial batch at
    the end of an epoch is skipped (like drop_last), so every step sees a full, fresh batch.
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int, process_index: int = 0, num_processes: int = 1):
        # batch_size: prompts per step, ppo.batch_size / rollout.samples_per_prompt
        if batch_size % num_processes:
            raise ConfigError(
                f"{batch_size} prompts per step (ppo.batch_size / rollout.samples_per_prompt) must be a multiple of "
                f"the number of processes ({num_processes})"
            )
        if num_prompts < batch_size:
            raise DataError(
                f"only {num_prompts} PPO training prompts for {batch_size} prompts per step (ppo.batch_size / "
                "rollout.samples_per_prompt): raise data.max_examples or lower ppo.batch_size"
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
        if zero_stage(accelerator) == 3:
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


def prompt_batches(query_ids: Sequence[Sequence[int]], batch_size: int, pad_id: int):
    """(first row, ids, mask) for each run of `batch_size` prompts, right-padded to that run's own width: the batches
    generate() sees."""
    queries = [torch.tensor(q, dtype=torch.long) for q in query_ids]
    for start in range(0, len(queries), batch_size):
        yield (start, *pad_right(queries[start : start + batch_size], pad_id))


@torch.no_grad()
def encode_prompts(encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], query_ids: Sequence[Sequence[int]],
                   batch_size: int, pad_id: int, device: torch.device | str) -> torch.Tensor:
    """An encoder's output (P, Q, d) for the P prompts (`encode`: the policy's `Seq2SeqPolicy.encode`, or the
    reference's `reference_encode`), Q being the longest prompt's length. Each row is its prompt's own output (up to
    float rounding), whatever it was batched with: the prompts are encoded shortest first, in groups of half a
    generation batch (`batch_size` / 2), each padded to its longest prompt only. A batch of DialogSum prompts in data
    order is padded to its longest, and attention costs grow with the square of that width: by length, an encoder
    pass costs an eighth to a fifth less (bench/RESULTS.md) for one more call. Columns past a row's group width are
    zeros; those and the group's padding are masked out wherever the states are used."""
    order = sorted(range(len(query_ids)), key=lambda i: len(query_ids[i]))
    group = max(batch_size // 2, 1)
    width = max(len(q) for q in query_ids)
    states: Optional[torch.Tensor] = None
    for start in range(0, len(order), group):
        rows = order[start : start + group]
        ids, mask = pad_right([torch.tensor(query_ids[i], dtype=torch.long) for i in rows], pad_id)
        hidden = encode(ids.to(device), mask.to(device))
        if states is None:
            states = hidden.new_zeros(len(query_ids), width, hidden.shape[-1])
        states[torch.tensor(rows, device=hidden.device), : hidden.shape[1]] = hidden
    return states


_WARNED_EXTRAS: set[tuple[str, ...]] = set()


@torch.no_grad()  # not inference_mode: the ids feed the PPO forward passes that are back-propagated
def generate_responses(
    model: Any,
    tokenizer: Any,
    query_ids: Sequence[Sequence[int]],
    settings: GenerationSettings,
    device: torch.device | str,
    rng: Optional[random.Random] = None,
    encoder_hidden_states: Optional[torch.Tensor] = None,
    samples_per_prompt: int = 1,
    compiled_width: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample `samples_per_prompt` (k) responses for each prompt, `settings.batch_size` prompts per `generate()` call.

    Returns query_ids, query_mask (B, Q) and response_ids, response_mask (B, R), all right-padded and on `device`,
    where B = prompts x k: prompt i's samples are rows i k ... i k + k - 1 (its query repeated).
    response_ids[:, 0] is the decoder start token; every position after a row's first eos is padding (pad id,
    mask 0). `rng` draws max_new_tokens per call when `settings.max_new_tokens_min` is set.
    `encoder_hidden_states` (P, Q, d): `encode_prompts` of the same prompts, one row per prompt; generate() then
    decodes from it instead of running the encoder. `compiled_width` (rollout.compile): decode with a static KV
    cache and a compiled decoder step (`decode_compiled`: the same tokens as generate()), the prompts padded to this
    many columns (masked out): one shape for every call, whatever its prompts' width or sampled length.
    """
    from transformers.modeling_outputs import BaseModelOutput

    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    responses: list[torch.Tensor] = []
    response_masks: list[torch.Tensor] = []
    k = samples_per_prompt
    extras = generation_config_extras(model) if compiled_width is not None else []
    own_loop = compiled_width is not None and not extras
    # generate()'s static cache and compiled step, for the models our own loop leaves to it.
    compiled = compiled_decoding_kwargs(settings.max_new_tokens) if compiled_width is not None and not own_loop else {}
    if extras and tuple(extras) not in _WARNED_EXTRAS:
        _WARNED_EXTRAS.add(tuple(extras))
        log.warning("rollout.compile: the model's generation_config sets %s, which only transformers' generate() "
                    "applies: decoding with generate() around the compiled step, slower than our own loop",
                    ", ".join(extras))
    for start, ids, mask in prompt_batches(query_ids, settings.batch_size, pad_id):
        if compiled_width is not None:
            columns = max(compiled_width - ids.shape[1], 0)
            ids, mask = F.pad(ids, (0, columns), value=pad_id), F.pad(mask, (0, columns))
        hidden = None
        if encoder_hidden_states is not None:
            # Zero columns past the states' own width (the compiled width's padding), masked out like it.
            hidden = encoder_hidden_states[start : start + settings.batch_size, : ids.shape[1]]
            hidden = F.pad(hidden, (0, 0, 0, ids.shape[1] - hidden.shape[1])).repeat_interleave(k, dim=0)
        # Each prompt k times in a row (what num_return_sequences would do, which greedy-mode generate refuses and
        # our sampler runs in); the encoder output, computed once per prompt, is repeated likewise.
        ids, mask = ids.repeat_interleave(k, dim=0).to(device), mask.repeat_interleave(k, dim=0).to(device)
        if own_loop:
            out = decode_compiled(model, ids, mask, settings, pad_id, eos_id, hidden, rng).cpu()
        else:
            encoded = {} if hidden is None else {"encoder_outputs": BaseModelOutput(last_hidden_state=hidden)}
            out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad_id, eos_token_id=eos_id,
                                 **encoded, **generation_kwargs(settings, rng), **compiled).cpu()
        out_mask = response_mask_from_ids(out, eos_id)
        out = out.masked_fill(out_mask == 0, pad_id)
        for row, row_mask in zip(out, out_mask):
            length = int(row_mask.sum())  # the mask is 1 on a prefix of each row
            responses.append(row[:length])
            response_masks.append(row_mask[:length])
    query_ids_t, query_mask = pad_right([torch.tensor(q, dtype=torch.long) for q in query_ids for _ in range(k)],
                                        pad_id)
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


# ----------------------------------------------------------------------------------------------------
# Forward passes and the trajectory


def policy_forward(policy: Any, rows: Trajectory, trl_first_token_mask: bool = False,
                   encoder_hidden_states: Optional[torch.Tensor] = None):
    """The policy (or its accelerator wrapper) on `rows` -> logits (b, T, V), log-probs (b, T), float32 values
    (b, T) of the predicted positions (None without a value head), and their loss mask (b, T).
    `encoder_hidden_states` (b, Q, d): the rows' prompts already encoded by this policy (no gradient flows into them)."""
    logits, values = policy(rows.query_ids, rows.query_mask, rows.response_ids, rows.response_mask,
                            encoder_hidden_states)
    logits = logits[:, :-1].float()
    logprobs = logprobs_from_logits(logits, rows.response_ids[:, 1:])
    values = None if values is None else values[:, :-1].float()
    return logits, logprobs, values, response_loss_mask(rows.response_mask, trl_first_token_mask)


@torch.no_grad()
def forward_trajectory(
    policy: Any,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    scores: torch.Tensor,
    *,
    chunk_size: int,
    trl_first_token_mask: bool = False,
    accelerator: Any = None,
    encoder_hidden_states: Optional[torch.Tensor] = None,
    reference_hidden_states: Optional[torch.Tensor] = None,
    samples_per_prompt: int = 1,
) -> Trajectory:
    """The `Trajectory` of generated rows: old log-probs and values of the policy and the reference log-probs
    (adapter off, or the frozen starting adapter: `Seq2SeqPolicy.reference_logits`), in eval mode (no dropout, as
    TRL), `chunk_size` rows at a time; values None without a value head. `encoder_hidden_states` (P, Q, d): the
    policy's `encode_prompts` of the P = B / `samples_per_prompt` prompts, row r's being r // samples_per_prompt;
    then the policy's pass runs its decoder only. `reference_hidden_states` (P, Q, d): likewise the reference's
    (`reference_encode`). Under ZeRO-3 every process must make the same number of calls."""
    unwrapped = accelerator.unwrap_model(policy) if accelerator is not None else policy
    width = response_ids.shape[1] - 1  # predicted positions
    rows = Trajectory(query_ids, query_mask, response_ids, response_mask, scores.float(),
                      *(torch.zeros(len(scores), width, device=response_ids.device) for _ in range(3)),
                      masks=torch.zeros_like(response_ids[:, 1:]))
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "ref_logprobs": [], "values": [], "masks": []}
    was_training = policy.training
    policy.eval()
    for start in range(0, len(rows), chunk_size):
        chunk = rows.select(slice(start, start + chunk_size)).trimmed()
        prompt_rows = torch.arange(start, start + len(chunk)) // samples_per_prompt

        def prompt_states(states: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if states is None else states[prompt_rows.to(states.device), : chunk.query_ids.shape[1]]

        with record_function("rollout/policy_forward"):
            _, logprobs, values, masks = policy_forward(policy, chunk, trl_first_token_mask,
                                                        prompt_states(encoder_hidden_states))
        with record_function("rollout/reference_forward"):
            ref_logits = unwrapped.reference_logits(chunk.query_ids, chunk.query_mask, chunk.response_ids,
                                                    chunk.response_mask, prompt_states(reference_hidden_states))
        ref_logprobs = logprobs_from_logits(ref_logits[:, :-1], chunk.response_ids[:, 1:])
        for key, value in zip(parts, (logprobs, ref_logprobs, values, masks)):
            if value is not None:
                parts[key].append(F.pad(value, (0, width - value.shape[1])))  # back to the batch width, masked out
    policy.train(was_training)
    for key, chunks in parts.items():
        setattr(rows, key, torch.cat(chunks) if chunks else None)
    return rows


def gather_trajectory(local: Trajectory, collectives: Collectives, pad_token_id: int) -> Trajectory:
    """Every process's rows in rank order: the global batch, on every process (padded to the widest process).
    Three collectives: the widths, then the integer and the float tensors, each packed into one."""
    if collectives.world_size == 1:
        return local
    widths = torch.tensor([local.query_ids.shape[1], local.response_ids.shape[1]])
    q, r = torch.stack(collectives.all_gather(widths)).max(dim=0).values.tolist()

    def pad(t: torch.Tensor, width: int, value: float = 0) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[1]), value=value)

    ints = torch.cat([pad(local.query_ids, q, pad_token_id), pad(local.query_mask, q), pad(local.response_ids, r,
                      pad_token_id), pad(local.response_mask, r), pad(local.masks, r - 1)], dim=1)
    per_token = [local.logprobs, local.ref_logprobs] + ([] if local.values is None else [local.values])
    floats = torch.cat([local.scores[:, None].float(), *(pad(t, r - 1) for t in per_token)], dim=1)
    ints, floats = (torch.cat(collectives.all_gather(t)) for t in (ints, floats))
    query_ids, query_mask, response_ids, response_mask, masks = ints.split([q, q, r, r, r - 1], dim=1)
    scores, logprobs, ref_logprobs, *values = floats.split([1] + [r - 1] * len(per_token), dim=1)
    return Trajectory(query_ids, query_mask, response_ids, response_mask, scores[:, 0], logprobs, ref_logprobs,
                      values[0] if values else None, masks)


def make_experience(
    policy: Any,
    tokenizer: Any,
    prompts: Any,
    reward_fn: Any,
    cfg: ExperimentConfig,
    accelerator: Any = None,
    rng: Optional[random.Random] = None,
) -> tuple[Trajectory, RolloutInfo]:
    """Generate, decode, score and forward this process's prompts (rows of the PPO dataset: input_ids, query, id):
    `cfg.rollout.samples_per_prompt` (k) summaries each, prompt i's in rows i k ... i k + k - 1.

    The classifier sees the dataset's `query` (the decoded prompt) and the summary, as the original notebook did.
    """
    device = accelerator.device if accelerator is not None else next(policy.parameters()).device
    k = cfg.rollout.samples_per_prompt
    started = time.perf_counter()
    with unwrap_for_generation(policy, accelerator) as model:
        # Before any merge: the old log-probs' encoder output must be the plain policy's.
        with record_function("rollout/encode"):
            encoded = encode_prompts(model.encode, prompts["input_ids"], cfg.rollout.batch_size,
                                     tokenizer.pad_token_id, device)
            reference_encoded = None
            if k > 1 and model.reference_adapter is None:
                # A prompt's k rows share the adapter-off reference's encoder output too: one pass per prompt.
                reference_encoded = encode_prompts(model.reference_encode, prompts["input_ids"],
                                                   cfg.rollout.batch_size, tokenizer.pad_token_id, device)
        with adapter_merged(model.peft_model) if merges_for_rollout(cfg) else nullcontext(), \
                record_function("rollout/generate"):
            query_ids, query_mask, response_ids, response_mask = generate_responses(
                model, tokenizer, prompts["input_ids"], cfg.rollout, device, rng, encoded, k,
                compiled_width=cfg.data.max_prompt_tokens if cfg.rollout.compile else None,
            )
    summaries = [s.strip() for s in tokenizer.batch_decode(response_ids, skip_special_tokens=True)]
    time_generate = time.perf_counter() - started

    started = time.perf_counter()
    with record_function("rollout/score"):
        scores = score_responses(reward_fn, [q for q in prompts["query"] for _ in range(k)], summaries)
    time_score = time.perf_counter() - started

    started = time.perf_counter()
    processes = accelerator.num_processes if accelerator is not None else 1
    chunk = cfg.ppo.forward_batch_size or max(cfg.ppo.mini_batch_size // processes, 1)
    trajectory = forward_trajectory(
        policy, query_ids, query_mask, response_ids, response_mask, scores.rewards.float().to(device),
        chunk_size=chunk, trl_first_token_mask=cfg.ppo.trl_first_token_mask, accelerator=accelerator,
        encoder_hidden_states=encoded, reference_hidden_states=reference_encoded, samples_per_prompt=k,
    )
    info = RolloutInfo(
        prompt_ids=[i for i in prompts["id"] for _ in range(k)],
        summaries=summaries,
        toxicity=scores.toxicity.float(),
        response_lengths=(response_mask.sum(dim=1) - 1).float().cpu(),
        time_generate=time_generate,
        time_score=time_score,
        time_forward=time.perf_counter() - started,
    )
    return trajectory, info


def log_samples(step: int, trajectory: Trajectory, info: RolloutInfo, count: int = 2) -> None:
    for i in range(min(count, len(info.summaries))):
        log.info("step %d sample %s: reward %.3f, toxicity %.3f: %r", step, info.prompt_ids[i],
                 trajectory.scores[i].item(), info.toxicity[i].item(), info.summaries[i][:200])


def rollout_stats(trajectory: Trajectory, info: RolloutInfo, collectives: Collectives) -> dict[str, float]:
    """Reward, toxicity and response-length stats over the global batch; timings averaged over processes."""
    local = torch.stack([info.toxicity, info.response_lengths], dim=1)
    toxicity, lengths = collectives.gather_rows(local).unbind(dim=1)
    timings = torch.tensor([info.time_generate, info.time_score, info.time_forward], dtype=torch.float64)
    timings = collectives.all_reduce_sum(timings) / collectives.world_size
    rewards = trajectory.scores.float().cpu()
    return {
        "env/reward_mean": rewards.mean().item(),
        "env/reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "env/toxicity_mean": toxicity.mean().item(),
        "tokens/response_len": lengths.mean().item(),
        "time/generate": timings[0].item(),
        "time/score": timings[1].item(),
        "time/forward": timings[2].item(),
    }
