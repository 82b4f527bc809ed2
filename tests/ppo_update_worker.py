"""PPO updates on one fixed global batch, on however many processes launched this (tests/train/test_ppo_distributed.py).

    python tests/ppo_update_worker.py --t5 DIR --out DIR [--accumulation K] [--max-grad-norm X] [--estimator rloo]
    accelerate launch ... tests/ppo_update_worker.py --t5 DIR --out DIR      # DDP or DeepSpeed ZeRO-2/3

Every process builds the same policy (tiny T5 + non-zero LoRA + a value head for gae) and the same fixed global rollout
(queries, responses, scores: no sampling), takes its contiguous slice of the rows, makes its trajectory and
gathers the global one, then runs `train.ppo.ppo_step` as the training loop does, once per entry of `STEPS`
(one mini-batch; several mini-batches and epochs with whitened rewards; a ratio guard that skips some
mini-batches). With a critic-free estimator (rloo, group) the rows are 4 prompts x 2 samples and a process's slice
holds whole prompts. The main process writes the stats of every step (`stats.json`) and the trainable weights after
each step (`weights-<step>.safetensors`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.config import load_config  # noqa: E402
from train.distributed import Collectives, configure_deepspeed, fix_deepspeed_cpu_ranks, gathered_trainable, use_cpu  # noqa: E402
from train.models import load_policy  # noqa: E402
from train.ppo import estimator_for, ppo_step  # noqa: E402
from train.ppo_core import ScoreShaper, make_kl_controller  # noqa: E402
from train.rollout import forward_trajectory, gather_trajectory, pad_right  # noqa: E402

ROWS = 8
# Per step: PPOConfig fields. Batch sizes are global; with 4 processes the 4-row mini-batches are 1 row each.
STEPS = [
    {"mini_batch_size": 8, "ppo_epochs": 1},
    {"mini_batch_size": 4, "ppo_epochs": 2, "whiten_rewards": True},
    {"mini_batch_size": 4, "ppo_epochs": 2, "ratio_threshold": 1.001},  # skips 2 of 4 mini-batches
]
# With 2 accumulation steps an optimizer step spans two mini-batches.
ACCUMULATED_STEPS = [
    {"mini_batch_size": 4, "ppo_epochs": 1},
    {"mini_batch_size": 2, "ppo_epochs": 2, "whiten_rewards": True},
]


def fixed_rollout(vocab: int, eos: int, seed: int = 5, samples_per_prompt: int = 1):
    """Ragged queries and responses ([start, ..., eos]) and scores, the same on every process; each query repeated
    in `samples_per_prompt` consecutive rows."""
    g = torch.Generator().manual_seed(seed)
    queries, responses = [], []
    for i in range(ROWS):
        q_len, r_len = 4 + (i * 3) % 7, 1 + (i * 5) % 8  # r_len: generated tokens before eos
        query = torch.cat([torch.randint(3, vocab, (q_len,), generator=g), torch.tensor([eos])])
        queries.append(query if i % samples_per_prompt == 0 else queries[-1])
        responses.append(torch.cat([torch.tensor([0]), torch.randint(3, vocab, (r_len,), generator=g), torch.tensor([eos])]))
    scores = torch.randn(ROWS, generator=g) * 3
    return (*pad_right(queries, 0), *pad_right(responses, 0), scores)


def build(t5: str, accumulation: int = 1, max_grad_norm=None, estimator: str = "gae"):
    # gae: a value loss weighted like the policy loss; the critic-free estimators have none (and refuse vf_coef).
    estimator_args = (["--ppo.vf_coef", "1.0"] if estimator == "gae"
                      else ["--ppo.advantage_estimator", estimator, "--rollout.samples_per_prompt", "2"])
    cfg = load_config(None, [*estimator_args,
        "--model.name_or_path", t5, "--model.dtype", "float32", "--model.value_head_dropout", "0",
        "--lora.r", "8", "--lora.alpha", "8", "--lora.dropout", "0",
        "--ppo.batch_size", str(ROWS), "--ppo.learning_rate", "1e-3",
        "--ppo.gradient_accumulation_steps", str(accumulation), "--ppo.score_normalization", "standardize",
        "--ppo.max_grad_norm", str(max_grad_norm),
    ])
    torch.manual_seed(0)
    policy, tokenizer = load_policy(cfg, with_value_head=estimator == "gae")
    with torch.no_grad():  # a non-zero adapter, so the policy differs from its KL reference
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    return cfg, policy, tokenizer


def run(t5: str, out: Path, make_accelerator=None, accumulation: int = 1, max_grad_norm=None,
        estimator: str = "gae") -> None:
    """`make_accelerator()` builds the Accelerator; it is called after the policy is built, so that under ZeRO-3
    the policy is not created partitioned (the non-zero LoRA init would not reach the shards)."""
    cfg, policy, tokenizer = build(t5, accumulation, max_grad_norm, estimator)
    k = cfg.rollout.samples_per_prompt
    accelerator = make_accelerator() if make_accelerator is not None else None
    assert len(tokenizer) == 1811  # the tiny T5's vocabulary (train/tiny_models.py)
    rollout = fixed_rollout(len(tokenizer), tokenizer.eos_token_id, samples_per_prompt=k)
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=cfg.ppo.learning_rate)
    collectives = Collectives.of(accelerator)
    if accelerator is not None:
        configure_deepspeed(accelerator, 1, accumulation, max_grad_norm)  # DeepSpeed's micro-batch: bookkeeping only
        policy, optimizer = accelerator.prepare(policy, optimizer)
    device = collectives.device
    share = slice(collectives.rank * ROWS // collectives.world_size, (collectives.rank + 1) * ROWS // collectives.world_size)
    p = cfg.ppo
    kl_ctl = make_kl_controller(p.init_kl_coef, p.adaptive_kl, p.kl_target, p.kl_horizon)
    shaper, generator = ScoreShaper(p.score_normalization), torch.Generator().manual_seed(3)
    all_stats = []
    save_weights(policy, accelerator, collectives, out / "weights-0.safetensors")
    steps = STEPS if accumulation == 1 else ACCUMULATED_STEPS
    for step, settings in enumerate(steps, 1):
        step_cfg = dataclasses.replace(cfg.ppo, **settings)
        local = forward_trajectory(policy, *(t[share].to(device) for t in rollout), chunk_size=2, accelerator=accelerator)
        trajectory = gather_trajectory(local, collectives, tokenizer.pad_token_id)
        stats = ppo_step(policy, optimizer, trajectory, kl_ctl, shaper, step_cfg, estimator_for(step_cfg, k), accelerator=accelerator,
                         generator=generator)
        all_stats.append({k: v for k, v in stats.items() if not k.startswith("time/")})
        save_weights(policy, accelerator, collectives, out / f"weights-{step}.safetensors")
    if collectives.rank == 0:
        (out / "stats.json").write_text(json.dumps({"world_size": collectives.world_size, "steps": all_stats}))


def save_weights(policy, accelerator, collectives: Collectives, path: Path) -> None:
    """The trainable weights, gathered (ZeRO-3), from the main process. Every process must call it."""
    from safetensors.torch import save_file

    unwrapped = accelerator.unwrap_model(policy) if accelerator is not None else policy
    with gathered_trainable(accelerator, policy):
        weights = {n: p.detach().float().cpu().clone() for n, p in unwrapped.named_parameters() if p.requires_grad}
    if collectives.rank == 0:
        save_file(weights, str(path))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--t5", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--max-grad-norm", type=float, default=None)
    parser.add_argument("--estimator", default="gae")
    args = parser.parse_args()
    from accelerate import Accelerator

    torch.set_num_threads(1)
    made = []

    def make_accelerator():
        made.append(Accelerator(cpu=use_cpu(), gradient_accumulation_steps=args.accumulation))
        fix_deepspeed_cpu_ranks(made[0])
        return made[0]

    args.out.mkdir(parents=True, exist_ok=True)
    run(args.t5, args.out, make_accelerator, args.accumulation, args.max_grad_norm, args.estimator)
    made[0].wait_for_everyone()
    made[0].end_training()


if __name__ == "__main__":
    main()
