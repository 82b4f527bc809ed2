"""Differential test: our PPO step (`train.rollout.forward_trajectory` + `train.ppo.ppo_step`) against the classic
TRL 0.11.4 `PPOTrainer.step`.

Both sides get the same tiny T5 + LoRA + value head (dropout 0 everywhere), the same queries, responses and
scores, and the same mini-batch order; ours runs with `trl_first_token_mask=True` (TRL's encoder-decoder mask).
TRL's KL-penalised rewards, advantages and returns are captured by wrapping its `compute_rewards` and
`compute_advantages`; ours from `kl_penalized_rewards` and `gae_advantages` on our trajectory, as `ppo_step` computes them.

trl==0.11.4 is a dev-only dependency (setup.cfg `dev` extra); its `step` runs in-process with transformers 5.
"""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import trl.trainer.ppo_trainer as trl_ppo_trainer  # the dev extra: pip install -e '.[dev]'
from trl import AutoModelForSeq2SeqLMWithValueHead, PPOTrainer
from trl import PPOConfig as TrlPPOConfig

from train.config import PPOConfig
from train.models import Seq2SeqPolicy, ValueHead, untie_lm_head
from train.ppo import estimator_for, make_optimizer, ppo_step
from train.ppo_core import ScoreShaper, gae_advantages, kl_penalized_rewards, make_kl_controller
from train.rollout import forward_trajectory

VOCAB = 48
PAD, EOS = 0, 1  # T5: the pad id is also the decoder start id
LR = 1e-3  # large enough that a wrong gradient moves a weight far beyond the 1e-5 tolerance


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Scalar stats compared key by key (TRL's names). Array-valued TRL stats (kl_dist, ratio, ...) are left out.
STAT_KEYS = [
    "objective/kl", "objective/kl_coef", "objective/entropy", "ppo/mean_non_score_reward", "ppo/mean_scores",
    "ppo/std_scores", "tokens/queries_len_mean", "tokens/queries_len_std", "tokens/responses_len_mean",
    "tokens/responses_len_std", "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/policy/entropy",
    "ppo/policy/approxkl", "ppo/policy/policykl", "ppo/policy/clipfrac", "ppo/policy/advantages_mean",
    "ppo/returns/mean", "ppo/returns/var", "ppo/val/vpred", "ppo/val/error", "ppo/val/clipfrac", "ppo/val/mean",
    "ppo/val/var", "ppo/val/var_explained", "ppo/learning_rate",
]


def _tokenizer():
    """A word-level PreTrainedTokenizerFast with T5's special ids (TRL only uses it to pad)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "</s>": EOS, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )
    assert len(tok) == VOCAB and tok.pad_token_id == PAD and tok.padding_side == "right"
    return tok


def _peft_t5(seed: int = 0):
    """A tiny T5 with a LoRA adapter whose B matrices are non-zero (so policy and reference differ)."""
    import peft
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        dropout_rate=0.0, decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS,
    )
    base = untie_lm_head(T5ForConditionalGeneration(config))
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q", "v"], lora_dropout=0.0, task_type=peft.TaskType.SEQ_2_SEQ_LM
    )
    model = peft.get_peft_model(base, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    return model


def _rollout_data(batch: int, seed: int = 1):
    """Ragged queries (ending in eos) and responses ([start, ..., eos]) of varied lengths, plus scores."""
    g = torch.Generator().manual_seed(seed)
    queries, responses = [], []
    for i in range(batch):
        q_len, r_len = 3 + (i * 2) % 5, 1 + (i * 3) % 6  # r_len: generated tokens before eos
        queries.append(torch.cat([torch.randint(3, VOCAB, (q_len,), generator=g), torch.tensor([EOS])]))
        responses.append(torch.cat([torch.tensor([PAD]), torch.randint(3, VOCAB, (r_len,), generator=g),
                                    torch.tensor([EOS])]))
    scores = torch.randn(batch, generator=g) * 2
    return queries, responses, scores


def _pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


def _permutations(n: int, seed: int):
    """The mini-batch orders our `generator` will draw, to feed TRL's np.random.permutation the same ones."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randperm(n, generator=g).numpy()


def _trl_scalar(value) -> float:
    return float(np.asarray(value).reshape(-1)[0])


def _run_both(monkeypatch, batch: int, mini: int, epochs: int, accumulation: int, **shared):
    """One PPO step on each side from identical starting points; returns everything to compare.

    `shared` settings have the same name in both configs (cliprange, cliprange_value, vf_coef, ...).
    """
    cfg = PPOConfig(
        learning_rate=LR, batch_size=batch, mini_batch_size=mini, ppo_epochs=epochs,
        gradient_accumulation_steps=accumulation, trl_first_token_mask=True, **shared,
    )
    peft_model = _peft_t5()
    torch.manual_seed(2)
    value_head = ValueHead(16, dropout=0.0)
    queries, responses, scores = _rollout_data(batch)

    # Ours, on deep copies.
    policy = Seq2SeqPolicy(copy.deepcopy(peft_model), copy.deepcopy(value_head))
    optimizer = make_optimizer(policy, cfg.learning_rate)  # ours, against TRL's own Adam
    trajectory = forward_trajectory(policy, *_pad(queries), *_pad(responses), scores.clone(), chunk_size=mini,
                                    trl_first_token_mask=True)
    kl_ctl = make_kl_controller(cfg.init_kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)
    rewards, non_score_rewards, kls = kl_penalized_rewards(
        trajectory.scores, trajectory.logprobs, trajectory.ref_logprobs, trajectory.masks, kl_ctl.value)
    values, advantages, returns = gae_advantages(trajectory.values, rewards, trajectory.masks, cfg.gamma, cfg.lam)
    ours_batch = SimpleNamespace(masks=trajectory.masks, kls=kls, non_score_rewards=non_score_rewards,
                                 rewards=rewards, values=values, advantages=advantages, returns=returns)
    ours_stats = ppo_step(policy, optimizer, trajectory, kl_ctl, ScoreShaper(), cfg, estimator_for(cfg),
                          generator=torch.Generator().manual_seed(7))

    # TRL, on the originals, with its step's intermediate tensors captured and our mini-batch order.
    trl_model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(peft_model, summary_dropout_prob=0.0)
    trl_model.v_head.summary.load_state_dict(value_head.summary.state_dict())
    trl_cfg = TrlPPOConfig(
        learning_rate=LR, batch_size=batch, mini_batch_size=mini, ppo_epochs=epochs,
        gradient_accumulation_steps=accumulation, seed=0, **shared,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and "no dataset" notices
        trainer = PPOTrainer(trl_cfg, trl_model, None, _tokenizer())
    captured = {}

    def spy(name):
        method = getattr(trainer, name)

        def wrapper(*args, **kwargs):
            captured[name] = method(*args, **kwargs)
            return captured[name]

        return wrapper

    monkeypatch.setattr(trainer, "compute_rewards", spy("compute_rewards"))
    monkeypatch.setattr(trainer, "compute_advantages", spy("compute_advantages"))
    orders = _permutations(batch, seed=7)
    monkeypatch.setattr(trl_ppo_trainer.np.random, "permutation", lambda n: next(orders))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trl_stats = trainer.step(queries, responses, [s.clone() for s in scores])
    return ours_batch, ours_stats, policy, kl_ctl, captured, trl_stats, trainer


def _trainable_pairs(policy: Seq2SeqPolicy, trainer: PPOTrainer):
    """(name, ours, theirs) for every LoRA matrix and the value head."""
    theirs = dict(trainer.model.pretrained_model.named_parameters())
    pairs = [(n, p, theirs[n]) for n, p in policy.peft_model.named_parameters() if p.requires_grad]
    for n, p in policy.value_head.summary.named_parameters():
        pairs.append((f"v_head.{n}", p, dict(trainer.model.v_head.summary.named_parameters())[n]))
    return pairs


def _assert_batch_matches(ours, captured, atol):
    trl_rewards, trl_non_score, trl_kls = captured["compute_rewards"]
    trl_values, trl_advantages, trl_returns = captured["compute_advantages"]
    assert ours.masks.sum() > 0 and ours.kls.abs().max() > 1e-3  # the adapter makes policy != reference
    for name, a, b in [
        ("kls", ours.kls, trl_kls), ("non_score_rewards", ours.non_score_rewards, trl_non_score),
        ("rewards", ours.rewards, trl_rewards), ("values", ours.values, trl_values),
        ("advantages", ours.advantages, trl_advantages), ("returns", ours.returns, trl_returns),
    ]:
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def test_one_minibatch_matches_trl_exactly(monkeypatch):
    ours_batch, ours, policy, kl_ctl, captured, theirs, trainer = _run_both(
        monkeypatch, batch=4, mini=4, epochs=1, accumulation=1
    )
    _assert_batch_matches(ours_batch, captured, atol=1e-6)
    for key in STAT_KEYS:
        assert ours[key] == pytest.approx(_trl_scalar(theirs[key]), rel=1e-5, abs=1e-6), key
    assert kl_ctl.value == pytest.approx(trainer.kl_ctl.value, rel=1e-9)
    assert kl_ctl.value != PPOConfig().init_kl_coef  # the adaptive controller did update
    start = dict(_peft_t5().named_parameters())  # the same seeded initial model
    for name, a, b in _trainable_pairs(policy, trainer):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        if "lora" in name:
            # Adam's first step moves every weight by ~lr = 1e-3, 100x the tolerance: a wrong gradient sign fails.
            assert (a - start[name]).abs().max() > 100 * 1e-5, name


def test_several_minibatches_epochs_and_accumulation_match_trl(monkeypatch):
    # 8 rows, mini-batches of 2, 2 accumulation steps, 2 epochs: 4 optimizer steps over 8 mini-batch losses.
    # Narrow clip ranges so both the policy and the value clipping branches are taken.
    ours_batch, ours, policy, kl_ctl, captured, theirs, trainer = _run_both(
        monkeypatch, batch=8, mini=2, epochs=2, accumulation=2, cliprange=0.02, cliprange_value=0.002, vf_coef=0.5
    )
    assert ours["ppo/policy/clipfrac"] > 0 and ours["ppo/val/clipfrac"] > 0
    _assert_batch_matches(ours_batch, captured, atol=1e-6)
    # Same mini-batch order on both sides, so only float rounding differs; it compounds over 4 Adam steps,
    # hence a looser (still tight) tolerance than the single-step case.
    for key in STAT_KEYS:
        assert ours[key] == pytest.approx(_trl_scalar(theirs[key]), rel=1e-4, abs=1e-5), key
    for name, a, b in _trainable_pairs(policy, trainer):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
