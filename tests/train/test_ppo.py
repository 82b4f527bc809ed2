"""PPO training (train/ppo.py) on the tiny default.

`ppo_step` in process on the tiny T5 (one process; test_ppo_distributed.py runs it on several, test_ppo_core_vs_trl.py
against TRL), then the real entry point as subprocesses: learning, two processes over gloo (sharded batch, identical
weights), DeepSpeed ZeRO-2 on CPU, SIGKILL + --resume equal to an uninterrupted run, the --resume guard, and the
reward server.
Subprocesses run with one torch thread: on a shared 2-core machine that is faster and far steadier than two.
"""

from __future__ import annotations

import importlib.util
import json
import math
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from train.config import PPOConfig, load_config
from train.ppo import estimator_for, ppo_step
from train.ppo_core import ScoreShaper, make_kl_controller
from train.rollout import generate_responses, score_responses
from helpers import (
    EXTENDED, FAST_LORA, PPO_TIMEOUT_S, REPO_ROOT, backend_params, copy_checkpoint, expected_scalars, free_port,
    generated_rollout, launcher, logged_numbers, ppo_args, ppo_env, read_ppo_log, rollout_trajectory, run_ppo,
    tensorboard_scalars, tiny_ppo_policy, wandb_history,
)

def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors and the value head's (when there is one)."""
    value_head = directory / "value_head.safetensors"
    return {**load_file(str(directory / "adapter_model.safetensors")),
            **(load_file(str(value_head)) if value_head.exists() else {})}


def debug_records(directory: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (directory / f"rank{rank}.jsonl").read_text().splitlines()]


def _sft_like_adapter(tiny, directory: Path, targets: str = "q,v") -> Path:
    """A saved r=8 adapter (FAST's LoRA) with non-zero B matrices: a starting policy that differs from the base."""
    from train.models import load_policy, save_policy

    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml",
                      ["--model.name_or_path", str(tiny.t5), *FAST_LORA, "--lora.target_modules", targets])
    torch.manual_seed(3)
    policy, _ = load_policy(cfg)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    return save_policy(policy, directory)


# ----------------------------------------------------------------------------------------------------
# ppo_step on the tiny T5, in process


def _kl(cfg: PPOConfig):
    return make_kl_controller(cfg.init_kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)


def _step(policy, optimizer, rollout: dict, kl_ctl, cfg: PPOConfig, accelerator=None, generator=None):
    """What one step of the training loop does with a rollout: forward passes, then `ppo_step`."""
    trajectory = rollout_trajectory(policy, rollout, cfg, cfg.mini_batch_size, accelerator)
    return ppo_step(policy, optimizer, trajectory, kl_ctl, ScoreShaper(), cfg, estimator_for(cfg), accelerator=accelerator,
                    generator=generator)


def _trainable(policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}


@pytest.mark.usefixtures("one_torch_thread")
def test_ppo_step_runs_repeatedly_with_finite_stats(tiny_artifacts):
    policy, tokenizer, cfg = tiny_ppo_policy(tiny_artifacts, batch_size=8, mini_batch_size=4, learning_rate=1e-3)
    policy.train()
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate)
    rollout = generated_rollout(policy, tokenizer, rows=8)
    kl_ctl = _kl(cfg)
    generator = torch.Generator().manual_seed(0)
    before = _trainable(policy)
    history = [_step(policy, optimizer, rollout, kl_ctl, cfg, generator=generator) for _ in range(3)]

    for stats in history:
        assert all(math.isfinite(v) for v in stats.values()), stats
        assert stats["ppo/policy/skipped"] == 0.0
    assert policy.training  # the mode is restored after the eval-mode passes
    # A fresh rollout: old and new policies agree on the first mini-batch, so its ratio is exactly 1.
    assert history[0]["objective/kl"] != 0.0
    assert history[0]["objective/kl_coef"] == cfg.init_kl_coef and kl_ctl.value != cfg.init_kl_coef
    assert history[0]["tokens/responses_len_mean"] == rollout["response_mask"].sum(1).float().mean().item()
    after = _trainable(policy)
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n or "value_head" in n)
    # Training on the same rollout fits the value head: the value error falls.
    assert history[-1]["ppo/val/error"] < history[0]["ppo/val/error"]


@pytest.mark.usefixtures("one_torch_thread")
def test_ppo_step_first_minibatch_ratio_is_one(tiny_artifacts):
    policy, tokenizer, cfg = tiny_ppo_policy(tiny_artifacts, batch_size=4, mini_batch_size=4)
    rollout = generated_rollout(policy, tokenizer, rows=4)
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate)
    stats = _step(policy, optimizer, rollout, _kl(cfg), cfg)
    assert stats["ppo/policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert stats["ppo/policy/first_ratio"] == stats["ppo/policy/ratio_mean"]  # one mini-batch: the first
    assert stats["ppo/policy/approxkl"] == pytest.approx(0.0, abs=1e-10)


@pytest.mark.usefixtures("one_torch_thread")
def test_ppo_step_ratio_guard_skips_every_minibatch(tiny_artifacts):
    policy, tokenizer, cfg = tiny_ppo_policy(tiny_artifacts, batch_size=8, mini_batch_size=4, ratio_threshold=0.5)
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    rollout = generated_rollout(policy, tokenizer, rows=8)
    before = _trainable(policy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = _step(policy, optimizer, rollout, _kl(cfg), cfg)
    assert sum("Skipping batch" in str(w.message) for w in caught) == 2  # both mini-batches
    assert stats["ppo/policy/skipped"] == 1.0 and stats["ppo/loss/total"] == 0.0
    after = _trainable(policy)
    # Zero gradients into a fresh Adam move nothing.
    assert all(torch.equal(before[n], after[n]) for n in before)


def _padded_wider(rollout: dict, extra_q: int, extra_r: int, pad_id: int = 0) -> dict:
    """`rollout` with `extra_q` / `extra_r` more all-padding columns, as a longer row elsewhere in the batch makes."""
    pad = lambda t, n, value: torch.nn.functional.pad(t, (0, n), value=value)
    return dict(query_ids=pad(rollout["query_ids"], extra_q, pad_id), query_mask=pad(rollout["query_mask"], extra_q, 0),
                response_ids=pad(rollout["response_ids"], extra_r, pad_id),
                response_mask=pad(rollout["response_mask"], extra_r, 0), scores=rollout["scores"])


@pytest.mark.usefixtures("one_torch_thread")
def test_trailing_padding_is_trimmed_and_changes_no_result(tiny_artifacts):
    policy, tokenizer, cfg = tiny_ppo_policy(tiny_artifacts, batch_size=4, mini_batch_size=2, learning_rate=1e-3)
    rollout = generated_rollout(policy, tokenizer, rows=4)
    wide = _padded_wider(rollout, extra_q=9, extra_r=7)
    narrow_batch = rollout_trajectory(policy, rollout, cfg, chunk_size=1)  # each row trimmed to itself
    wide_batch = rollout_trajectory(policy, wide, cfg, chunk_size=4)
    trimmed = wide_batch.trimmed()
    assert trimmed.query_ids.shape[1] == int(rollout["query_mask"].sum(1).max())
    assert trimmed.response_ids.shape[1] == int(rollout["response_mask"].sum(1).max())
    assert trimmed.logprobs.shape[1] == trimmed.response_ids.shape[1] - 1
    assert torch.equal(trimmed.response_ids, rollout["response_ids"][:, : trimmed.response_ids.shape[1]])

    assert wide_batch.logprobs.shape[1] == narrow_batch.logprobs.shape[1] + 7  # the batch width is kept...
    assert not wide_batch.masks[:, -7:].any()  # ...and the extra columns are masked out
    for name in ("logprobs", "ref_logprobs", "values"):
        got, expected = getattr(wide_batch, name)[:, :-7], getattr(narrow_batch, name)
        torch.testing.assert_close(got * narrow_batch.masks, expected * narrow_batch.masks, atol=1e-5, rtol=0)

    # A whole step on the padded rollout trains the same weights.
    results = []
    for r in (rollout, wide):
        policy, _, _ = tiny_ppo_policy(tiny_artifacts, batch_size=4, mini_batch_size=2)
        start = _trainable(policy)
        optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
        stats = _step(policy, optimizer, r, _kl(cfg), cfg, generator=torch.Generator().manual_seed(0))
        results.append((stats, _trainable(policy)))
    (stats_a, weights_a), (stats_b, weights_b) = results
    assert stats_a["ppo/loss/total"] == pytest.approx(stats_b["ppo/loss/total"], abs=1e-6)
    assert any(not torch.equal(weights_a[n], start[n]) for n in start)  # the step moved the weights
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], atol=1e-6, rtol=0)


@pytest.mark.usefixtures("one_torch_thread")
def test_ppo_step_with_accelerator_and_accumulation_matches_plain_loop(tiny_artifacts):
    from accelerate import Accelerator

    results = []
    for use_accelerator in (False, True):
        policy, tokenizer, cfg = tiny_ppo_policy(
            tiny_artifacts, batch_size=8, mini_batch_size=2, gradient_accumulation_steps=2, max_grad_norm=0.5
        )
        start = _trainable(policy)
        optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
        rollout = generated_rollout(policy, tokenizer, rows=8)
        accelerator = None
        if use_accelerator:
            accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
            policy, optimizer = accelerator.prepare(policy, optimizer)
        _step(policy, optimizer, rollout, _kl(cfg), cfg, accelerator=accelerator,
              generator=torch.Generator().manual_seed(3))
        results.append(_trainable(policy))
    plain, accelerated = results
    moved = [n for n in start if not torch.equal(plain[n], start[n])]
    assert any("lora_B" in n for n in moved) and any("value_head" in n for n in moved)  # the optimizer stepped
    for name in plain:
        torch.testing.assert_close(plain[name], accelerated[name], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------
# The entry point


def test_existing_checkpoints_without_resume_is_one_clear_error(tmp_path, tiny_artifacts):
    (tmp_path / "ppo" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "ppo" / "checkpoints" / "checkpoint-2" / "COMPLETE").write_text("ok\n")
    proc = subprocess.run([sys.executable, "-m", "train.ppo", *ppo_args(tiny_artifacts, tmp_path)], cwd=REPO_ROOT,
                          env=ppo_env(), capture_output=True, text=True, timeout=PPO_TIMEOUT_S)
    assert proc.returncode == 2
    assert "has checkpoints from an earlier run: pass --resume" in proc.stderr
    assert "Traceback" not in proc.stderr


def mean_sampled_reward(tiny, adapter: Path | None, num_prompts: int = 128) -> float:
    """Mean reward of summaries sampled (fixed seed) for held-out prompts: the PPO split's test part."""
    import datasets

    from rewards.reward_fn import make_reward_fn
    from train.data import build_ppo_datasets
    from train.models import load_policy

    datasets.disable_progress_bars()
    cfg = load_config(REPO_ROOT / "configs" / "tiny.yaml", [
        "--data.path", str(tiny.dialogsum), "--model.name_or_path", str(tiny.t5),
        "--reward.model_name_or_path", str(tiny.roberta), "--data.max_prompt_tokens", "64", "--rollout.batch_size", "64",
    ])
    cfg.model.adapter = str(adapter) if adapter else None
    policy, tokenizer = load_policy(cfg)
    policy.eval()
    prompts = build_ppo_datasets(cfg.data, tokenizer)["test"].select(range(num_prompts))
    torch.manual_seed(1234)
    _, _, responses, _ = generate_responses(policy, tokenizer, prompts["input_ids"], cfg.rollout, "cpu")
    summaries = tokenizer.batch_decode(responses, skip_special_tokens=True)
    with make_reward_fn(cfg.reward) as reward_fn:
        return score_responses(reward_fn, list(prompts["query"]), summaries).rewards.mean().item()


# The tiny T5 is randomly initialised: its samples are word salad in which ~40% of 32-token summaries contain an
# insult. A LoRA that also reaches the output projections (o, wo, lm_head) can steer word choice within 30 steps.
LEARN = ["--ppo.steps", "30", "--ppo.learning_rate", "3e-3", "--ppo.ppo_epochs", "2", "--ppo.init_kl_coef", "0.05",
         "--lora.target_modules", "q,v,o,wo,lm_head"]


# The tiny T5's lm_head is untied (train.models.untie_lm_head) although its config keeps tie_word_embeddings.
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
def test_ppo_raises_the_reward_on_the_tiny_default(tmp_path, tiny_artifacts):
    run_ppo(ppo_args(tiny_artifacts, tmp_path, *LEARN))
    log = read_ppo_log(tmp_path)
    assert [r["step"] for r in log] == list(range(1, 31))
    for key in ("objective/kl", "objective/kl_coef", "ppo/returns/mean", "ppo/policy/advantages_mean",
                "ppo/loss/policy", "ppo/loss/value", "ppo/policy/clipfrac", "ppo/val/clipfrac", "ppo/policy/entropy",
                "env/reward_mean", "env/reward_std", "env/toxicity_mean", "tokens/response_len",
                "time/generate", "time/score", "time/update", "time/step"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in log), key
    # The default tracker, TensorBoard, got every number of log.jsonl at its step; no other tracker ran.
    assert tensorboard_scalars(tmp_path / "ppo" / "tensorboard") == expected_scalars(log)
    assert not (tmp_path / "ppo" / "wandb").exists()
    # Held-out prompts, same sampling seed: the trained adapter against the starting policy (a fresh LoRA = base).
    before = mean_sampled_reward(tiny_artifacts, None)
    after = mean_sampled_reward(tiny_artifacts, tmp_path / "ppo" / "adapter")
    assert after > before + 0.5, (before, after)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
@pytest.mark.parametrize("estimator", ["rloo", "group"])
def test_the_critic_free_estimators_raise_the_reward_without_a_value_head(tmp_path, tiny_artifacts, estimator):
    # As many summaries per step as PPO's test (16): 4 prompts x 4 samples.
    run_ppo(ppo_args(tiny_artifacts, tmp_path, *LEARN, "--ppo.advantage_estimator", estimator,
                     "--rollout.samples_per_prompt", "4"))
    log = read_ppo_log(tmp_path)
    assert [r["step"] for r in log] == list(range(1, 31))
    for key in ("objective/kl", "ppo/policy/advantages_mean", "ppo/loss/policy", "ppo/policy/entropy",
                "ppo/policy/clipfrac", "env/reward_mean"):
        assert all(math.isfinite(r[key]) for r in log), key
    assert not any(key.startswith(("ppo/val/", "ppo/returns/", "ppo/loss/value")) for key in log[-1])
    assert ("ppo/loss/kl" in log[-1]) == (estimator == "group")  # GRPO's KL is a loss term, RLOO's a reward penalty
    adapter = tmp_path / "ppo" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "value_head.safetensors").exists()
    before = mean_sampled_reward(tiny_artifacts, None)
    after = mean_sampled_reward(tiny_artifacts, adapter)
    assert after > before + 0.5, (before, after)


@pytest.mark.parametrize("trackers", ["tensorboard,wandb", "none"])
def test_tensorboard_and_wandb_offline_get_the_log_and_none_logs_nowhere(tmp_path, tiny_artifacts, trackers):
    # wandb offline (no network), with its own WANDB_DIR: wandb's environment variables win over our defaults.
    wandb_env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb-dir"),
                 **{f"WANDB_{name}_DIR": str(tmp_path / name.lower()) for name in ("CACHE", "CONFIG", "DATA")}}
    env = {**{k: v for k, v in ppo_env().items() if not k.startswith("WANDB_")}, **wandb_env}
    run_ppo(ppo_args(tiny_artifacts, tmp_path, "--ppo.steps", "2", "--ppo.batch_size", "8", "--trackers", trackers),
            env=env)
    log = read_ppo_log(tmp_path)
    assert [r["step"] for r in log] == [1, 2]
    assert not (tmp_path / "ppo" / "wandb").exists()  # with WANDB_DIR set, wandb writes there
    if trackers == "none":
        assert not (tmp_path / "ppo" / "tensorboard").exists() and not (tmp_path / "wandb-dir").exists()
        return
    assert tensorboard_scalars(tmp_path / "ppo" / "tensorboard") == expected_scalars(log)
    rows = wandb_history(tmp_path / "wandb-dir" / "wandb")
    assert [row["_step"] for row in rows] == [1, 2]
    for row, record in zip(rows, log):
        assert {k: row[k] for k in logged_numbers(record)} == pytest.approx(logged_numbers(record))


@pytest.mark.parametrize("backend", backend_params("zero2"))  # ZeRO-2 runs in bf16 by default
def test_two_processes_shard_train_in_step_and_resume_exactly(tmp_path, tiny_artifacts, backend):
    # deepspeed is in the dev extra: a missing install fails here rather than skipping.
    assert importlib.util.find_spec("deepspeed"), "deepspeed is not installed: pip install -e '.[dev]'"
    straight, resumed, debug = tmp_path / "straight", tmp_path / "resumed", tmp_path / "debug"
    steps = 4
    common = ["--ppo.steps", str(steps), "--ppo.batch_size", "8", "--ppo.mini_batch_size", "4",
              "--ppo.learning_rate", "1e-3", "--ppo.save_every_steps", "2"]
    start = []
    if backend == "zero3":
        # ZeRO-3 also adapts lm_head (its frozen base weight is sharded there and must not end up in the adapter),
        # and runs the KL reference as a frozen second adapter, partitioned like the rest.
        sft = _sft_like_adapter(tiny_artifacts, tmp_path / "sft", "q,v,lm_head")
        start = ["--lora.target_modules", "q,v,lm_head", "--model.adapter", str(sft), "--ppo.reference", "initial_adapter"]
    env = ppo_env(DS_ACCELERATOR="cpu")
    run_ppo(ppo_args(tiny_artifacts, straight, *common, *start, "--debug_dir", str(debug)), launcher=launcher(backend),
            env=env)

    # Two processes with their own prompts, kept in step: the same weights on both after every step.
    ranks = [debug_records(debug, r) for r in range(2)]
    assert [len(r) for r in ranks] == [steps, steps]
    seen = set()
    for step, (a, b) in enumerate(zip(*ranks), 1):
        assert a["step"] == b["step"] == step
        assert len(a["example_ids"]) == len(b["example_ids"]) == 4  # 8 global rollouts, 4 per process
        assert not set(a["example_ids"]) & set(b["example_ids"])
        assert not seen & set(a["example_ids"] + b["example_ids"])  # fresh prompts every step
        seen |= set(a["example_ids"] + b["example_ids"])
        assert a["params_sha256"] == b["params_sha256"], f"weights differ between ranks after step {step}"
    assert len({r["params_sha256"] for r in ranks[0]}) == steps  # the weights changed every step
    log = read_ppo_log(straight)
    assert [r["step"] for r in log] == list(range(1, steps + 1))  # the main process alone writes the log
    if backend == "zero3":
        assert abs(log[0]["objective/kl"]) < 1e-4 < abs(log[1]["objective/kl"])  # anchored to the starting adapter
    # The saved adapter is whole (under ZeRO-3 the shards are gathered) and trained: it moved from where it started
    # (LoRA B = 0 for a fresh adapter).
    trained = adapter_tensors(straight / "ppo" / "adapter")
    expected_dtype = torch.bfloat16 if backend.endswith("bf16") else torch.float32  # bf16 really engaged
    assert {t.dtype for t in trained.values()} == {expected_dtype}
    initial = adapter_tensors(sft) if start else {k: torch.zeros_like(v) for k, v in trained.items() if "lora_B" in k}
    lora_b = [k for k in trained if "lora_B" in k]
    assert lora_b and all(v.numel() > 0 for v in trained.values())
    assert not any("base_layer" in k or ".reference." in k for k in trained)  # no frozen weights in the adapter
    assert any(not torch.equal(trained[k], initial[k]) for k in lora_b)
    checkpoint = straight / "ppo" / "checkpoints" / "checkpoint-2"
    deepspeed_state = (checkpoint / "deepspeed").is_dir()
    assert deepspeed_state == backend.startswith("zero") and (checkpoint / "rng-rank1.pt").is_file()

    # Killed right after the step-2 checkpoint, resumed: the same adapter, bit for bit (bf16 included: the fp32
    # master weights come from the checkpoint), and the same logged steps.
    copy_checkpoint(straight, "ppo", 2, resumed)
    run_ppo(ppo_args(tiny_artifacts, resumed, *common, *start, "--resume"), launcher=launcher(backend), env=env)
    got = adapter_tensors(resumed / "ppo" / "adapter")
    assert got.keys() == trained.keys()
    for name in trained:
        assert torch.equal(got[name], trained[name]), name
    for a, b in zip(read_ppo_log(straight)[2:], read_ppo_log(resumed), strict=True):
        assert a["step"] == b["step"] and a["env/reward_mean"] == b["env/reward_mean"]
        assert a["objective/kl"] == b["objective/kl"]


@pytest.mark.parametrize("backend,estimator", [pytest.param("ddp", "rloo", marks=EXTENDED), ("zero3", "group")])
def test_critic_free_runs_keep_a_prompts_samples_on_one_process_and_resume_exactly(tmp_path, tiny_artifacts, backend,
                                                                                    estimator):
    # ZeRO-3: the policy's and the adapter-off reference's per-prompt encoder passes run on gathered weights.
    straight, resumed, debug = tmp_path / "straight", tmp_path / "resumed", tmp_path / "debug"
    common = ["--ppo.steps", "4", "--ppo.batch_size", "8", "--ppo.mini_batch_size", "4", "--ppo.learning_rate", "1e-3",
              "--ppo.save_every_steps", "2", "--ppo.advantage_estimator", estimator, "--rollout.samples_per_prompt",
              "2"]
    env = ppo_env(DS_ACCELERATOR="cpu")
    run_ppo(ppo_args(tiny_artifacts, straight, *common, "--debug_dir", str(debug)), launcher=launcher(backend), env=env)
    ranks = [debug_records(debug, r) for r in range(2)]
    for step, (a, b) in enumerate(zip(*ranks), 1):
        # 8 summaries = 4 prompts x 2 samples; each process sampled both summaries of its own 2 prompts.
        for record in (a, b):
            ids = record["example_ids"]
            assert len(ids) == 4 and ids[0] == ids[1] and ids[2] == ids[3] and ids[0] != ids[2], ids
        assert not set(a["example_ids"]) & set(b["example_ids"])
        assert a["params_sha256"] == b["params_sha256"], f"weights differ between ranks after step {step}"
    trained = adapter_tensors(straight / "ppo" / "adapter")
    assert not (straight / "ppo" / "checkpoints" / "checkpoint-2" / "policy" / "value_head.safetensors").exists()
    copy_checkpoint(straight, "ppo", 2, resumed)
    run_ppo(ppo_args(tiny_artifacts, resumed, *common, "--resume"), launcher=launcher(backend), env=env)
    got = adapter_tensors(resumed / "ppo" / "adapter")
    assert got.keys() == trained.keys()
    for name in trained:
        assert torch.equal(got[name], trained[name]), name
    for a, b in zip(read_ppo_log(straight)[2:], read_ppo_log(resumed), strict=True):
        assert a["env/reward_mean"] == b["env/reward_mean"] and a["objective/kl"] == b["objective/kl"]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_artifacts):
    common = ["--ppo.steps", "5", "--ppo.save_every_steps", "2", "--ppo.batch_size", "8", "--ppo.mini_batch_size", "4",
              "--ppo.learning_rate", "1e-3", "--rollout.max_new_tokens_min", "8", "--rollout.max_new_tokens", "24"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_ppo(ppo_args(tiny_artifacts, straight, *common))

    command = [sys.executable, "-m", "train.ppo", *ppo_args(tiny_artifacts, killed, *common)]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=ppo_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "ppo" / "checkpoints" / "checkpoint-2" / "COMPLETE"
    deadline = time.monotonic() + PPO_TIMEOUT_S
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert marker.exists() and not (killed / "ppo" / "adapter").exists()

    resumed = run_ppo(ppo_args(tiny_artifacts, killed, *common, "--resume"))
    assert "resumed from" in resumed.stderr
    expected, got = adapter_tensors(straight / "ppo" / "adapter"), adapter_tensors(killed / "ppo" / "adapter")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    assert [r["step"] for r in read_ppo_log(killed)] == [1, 2, 3, 4, 5]  # steps after the checkpoint logged once
    # Same rollouts after the resume point, too: the logged rewards agree.
    for a, b in zip(read_ppo_log(straight), read_ppo_log(killed)):
        assert a["env/reward_mean"] == pytest.approx(b["env/reward_mean"], abs=1e-6)


def test_initial_adapter_reference_anchors_the_kl_to_the_starting_policy_and_resumes(tmp_path, tiny_artifacts):
    adapter = _sft_like_adapter(tiny_artifacts, tmp_path / "sft")
    common = ["--model.adapter", str(adapter), "--ppo.batch_size", "8", "--ppo.learning_rate", "3e-3",
              "--ppo.forward_batch_size", "8"]
    # Anchored to the base, the starting policy is already far from its reference; anchored to itself it is not.
    run_ppo(ppo_args(tiny_artifacts, tmp_path / "base", *common, "--ppo.steps", "1", "--ppo.reference", "base"))
    base_kl = read_ppo_log(tmp_path / "base")[0]["objective/kl"]
    straight = tmp_path / "straight"
    run_ppo(ppo_args(tiny_artifacts, straight, *common, "--ppo.steps", "3", "--ppo.reference", "initial_adapter"))
    log = read_ppo_log(straight)
    assert abs(log[0]["objective/kl"]) < 1e-4 < 0.1 < base_kl, (log[0]["objective/kl"], base_kl)
    assert abs(log[-1]["objective/kl"]) > 1e-4  # the policy moved away from its frozen reference

    # Resume: the reference is again the configured starting adapter, not the checkpoint's adapter.
    resumed = tmp_path / "resumed"
    args = [*common, "--ppo.reference", "initial_adapter", "--ppo.save_every_steps", "1"]
    run_ppo(ppo_args(tiny_artifacts, resumed, *args, "--ppo.steps", "1"))
    run_ppo(ppo_args(tiny_artifacts, resumed, *args, "--ppo.steps", "3", "--resume"))
    for a, b in zip(log, read_ppo_log(resumed), strict=True):
        assert b["objective/kl"] == pytest.approx(a["objective/kl"], abs=1e-6)
    expected, got = adapter_tensors(straight / "ppo" / "adapter"), adapter_tensors(resumed / "ppo" / "adapter")
    assert expected.keys() == got.keys() and not any(".reference." in k for k in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_sigterm_checkpoints_the_current_step_and_exits_with_status_3(tmp_path, tiny_artifacts):
    from train.preemption import PREEMPTED_EXIT_CODE

    command = [sys.executable, "-m", "train.ppo",
               *ppo_args(tiny_artifacts, tmp_path, "--ppo.steps", "50", "--ppo.batch_size", "8")]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=ppo_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    log_file = tmp_path / "ppo" / "log.jsonl"
    deadline = time.monotonic() + PPO_TIMEOUT_S
    while not (log_file.exists() and log_file.read_text().strip()) and proc.poll() is None:
        assert time.monotonic() < deadline, "no PPO step was logged"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=PPO_TIMEOUT_S)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    steps = [r["step"] for r in read_ppo_log(tmp_path)]
    assert 1 <= len(steps) < 50
    state = json.loads((tmp_path / "ppo" / "checkpoints" / f"checkpoint-{steps[-1]}" / "trainer_state.json").read_text())
    assert state["step"] == steps[-1] and state["data"]["position"] == 8 * steps[-1]
    assert not (tmp_path / "ppo" / "adapter").exists()  # stopped early: no final adapter


def test_two_steps_with_the_reward_server(tmp_path, tiny_artifacts):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "rewards.server", "--reward.model_name_or_path", str(tiny_artifacts.roberta),
         "--reward.device", "cpu", "--reward_server.port", str(port), "--reward_server.log_level", "warning"],
        cwd=REPO_ROOT, env=ppo_env(DETOX_REWARD_TOKEN="ppo-test"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"reward server died: {server.stderr.read()}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "reward server did not start"
            time.sleep(0.2)
        run_ppo(ppo_args(tiny_artifacts, tmp_path, "--ppo.steps", "2", "--ppo.batch_size", "8",
                          "--reward.url", f"http://127.0.0.1:{port}"),
                env=ppo_env(DETOX_REWARD_TOKEN="ppo-test"))
        served = httpx.get(f"http://127.0.0.1:{port}/stats", headers={"Authorization": "Bearer ppo-test"},
                           timeout=5.0).json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert served["texts"] == 2 * 8  # every summary of both steps was scored by the server
    log = read_ppo_log(tmp_path)
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(r["env/reward_mean"])) for r in log)
    assert (tmp_path / "ppo" / "adapter" / "adapter_model.safetensors").is_file()
