"""Experiment configuration: dataclasses loaded from YAML, with command-line overrides.

Every default lives here, once. A recipe in `configs/` overrides some of them and the command line
overrides the recipe:

    python -m eval.evaluate --config configs/tiny.yaml --eval.max_examples 20 --model.dtype=float32

Unknown keys, values of the wrong type and missing files raise `ConfigError` with one message that
says what is wrong and how to fix it. The grammar itself (YAML -> dataclasses, overrides, typing) lives in
`rewards.config`, the bottom of the import order, so that the reward server shares it without importing `train`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import yaml

from rewards.config import (REWARD_BOUNDS, REWARD_SERVER_BOUNDS, RewardConfig, RewardServerConfig, check_bounds,
                            check_reward, check_reward_server, load_dataclass, read_yaml)
from train.atomic import write_text
from train.errors import ConfigError
from train.trackers import check_trackers

PROMPT_TEMPLATE = "\nSummarize the following conversation.\n\n{dialogue}\n\nSummary:\n"


@dataclass
class DataConfig:
    # Hub id (knkarthick/dialogsum) or a local directory in the Hugging Face CSV layout
    # (train/validation/test.csv) or the original cylnlp JSONL layout (dialogsum.{train,dev,test}.jsonl).
    path: str = "knkarthick/dialogsum"
    # Keep dialogues with min < len(dialogue) <= max characters, as the original notebook did.
    min_dialogue_chars: int = 200
    max_dialogue_chars: int = 1000
    prompt_template: str = PROMPT_TEMPLATE
    max_prompt_tokens: int = 512  # prompts longer than this are truncated
    max_summary_tokens: int = 128  # SFT labels longer than this are truncated
    train_fraction: float = 0.8  # 80/20 split of the filtered train split, without shuffling
    max_examples: Optional[int] = None  # cap on examples per split (quick runs); None = all


@dataclass
class ModelConfig:
    name_or_path: str = "google/flan-t5-base"  # hub id or local directory
    revision: Optional[str] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    quantization: Optional[Literal["8bit", "4bit"]] = None  # bitsandbytes base (CUDA only)
    adapter: Optional[str] = None  # existing LoRA adapter (local directory or hub id); None = fresh LoRA
    value_head_dropout: float = 0.1
    trust_remote_code: bool = False


@dataclass
class LoraSettings:
    r: int = 32
    alpha: int = 32
    target_modules: list[str] = field(default_factory=lambda: ["q", "v"])
    dropout: float = 0.05
    bias: Literal["none", "all", "lora_only"] = "none"


@dataclass
class GenerationSettings:
    batch_size: int = 16  # prompts per generate() call
    do_sample: bool = True
    top_k: int = 0  # 0 = no top-k filtering (the original notebook's sampling)
    top_p: float = 1.0
    temperature: float = 1.0
    min_length: int = 5
    max_new_tokens: int = 400
    # When set, each rollout batch draws max_new_tokens uniformly from [max_new_tokens_min, max_new_tokens)
    # like the original notebook's LengthSampler(100, 400). None = always max_new_tokens.
    max_new_tokens_min: Optional[int] = None
    num_beams: int = 1
    # How a sampled token is drawn: "inverse_cdf" (one uniform number per row and step: train.generation.InverseCdfSampler)
    # or "multinomial" (transformers' own, one random number per vocabulary entry: slower on a CPU). The same
    # distribution; a seed gives other samples with each. Beam search always uses transformers'.
    sampler: Literal["inverse_cdf", "multinomial"] = "inverse_cdf"


@dataclass
class RolloutSettings(GenerationSettings):
    # Summaries sampled per prompt in a PPO step (k): one generate() call samples all k, the prompt's encoder runs
    # once for them, and the k rows of a prompt stay on one process. ppo.batch_size counts rows (prompts x k).
    # The critic-free estimators (ppo.advantage_estimator rloo / group) compare a prompt's samples: k >= 2.
    samples_per_prompt: int = 1
    # Decode with a static KV cache and a torch.compile'd decoder step (transformers' compiled model call in our own
    # decoding loop, train.generation.decode_compiled: generate()'s tokens; inductor, no CUDA graphs). Prompts are
    # padded to data.max_prompt_tokens and the cache sized for max_new_tokens, so a few compiled graphs serve a run
    # (one per self-attention window: 64, 128, 256, ... slots up to the cache length; again for a process's smaller
    # last rollout batch); compiling costs tens of seconds, so it pays on long runs only (bench/RESULTS.md).
    # Identical samples in float32; in bf16 its kernels round otherwise.
    compile: bool = False


@dataclass
class SFTConfig:
    # Defaults follow the original notebook's adapter training (AdamW, lr 1e-3, one epoch).
    learning_rate: float = 1e-3
    batch_size: int = 8  # global: examples per optimisation step (before accumulation) over all processes
    gradient_accumulation_steps: int = 1
    num_epochs: float = 1.0
    max_steps: Optional[int] = None  # overrides num_epochs when set
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every_steps: int = 100
    eval_rouge_examples: int = 50  # validation examples generated for ROUGE at each evaluation
    early_stopping_patience: Optional[int] = None  # evaluations without improvement before stopping
    save_every_steps: int = 200
    keep_checkpoints: int = 2  # newest complete checkpoints kept on disk; older ones are deleted
    log_every_steps: int = 10


@dataclass
class PPOConfig:
    # Defaults reproduce the original notebook; the rest are the classic TRL PPOTrainer's defaults.
    # The advantage estimator (train/ppo_core.py, `make_estimator`): "gae" (PPO: a value head, GAE over the response
    # tokens, advantages whitened over the batch), "rloo" (REINFORCE leave-one-out: a summary's reward minus the mean
    # reward of its prompt's other k - 1 samples) or "group" (GRPO: the reward standardised within its prompt's k
    # samples). rloo and group build no value head and need rollout.samples_per_prompt >= 2.
    advantage_estimator: Literal["gae", "rloo", "group"] = "gae"
    # Where the KL to the reference enters: "reward" (a per-token penalty -kl_coef * (logp - logp_ref) on the reward,
    # as classic PPO and RLOO), "loss" (kl_coef times the k3 estimator exp(r) - r - 1, r = logp_ref - logp, per token
    # in the loss, as GRPO), or "auto": "loss" for group, else "reward". kl_coef: init_kl_coef and the controller.
    kl_penalty: Literal["auto", "reward", "loss"] = "auto"
    learning_rate: float = 1.41e-5
    batch_size: int = 16  # global rollout batch
    mini_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    ppo_epochs: int = 1
    steps: int = 10  # PPO steps (the original notebook ran 10)
    init_kl_coef: float = 0.2
    adaptive_kl: bool = True
    kl_target: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False
    # Score shaping before the KL penalty (off in the original notebook: raw nothate logits). "scale" divides by
    # the running std of all scores seen (TRL's use_score_scaling), "standardize" also subtracts the running mean
    # (TRL's use_score_norm); score_clip then clips to [-score_clip, score_clip].
    score_normalization: Literal["none", "scale", "standardize"] = "none"
    score_clip: Optional[float] = None
    ratio_threshold: float = 10.0
    max_grad_norm: Optional[float] = None
    # TRL 0.11.4 masks out the first generated token of encoder-decoder responses (an off-by-one); true
    # reproduces that exactly (differential test), false (default) trains on every response token.
    trl_first_token_mask: bool = False
    # The KL reference. "base": the base model with the adapter switched off (as the original notebook).
    # "initial_adapter": a frozen second copy of the adapter PPO starts from (model.adapter, e.g. the SFT
    # adapter), so the KL measures drift from the SFT policy.
    # Either way one base model is in memory; without model.adapter both are the same model.
    reference: Literal["base", "initial_adapter"] = "base"
    # Rows per no-grad forward pass for the old and reference log-probs, per process; null = this process's
    # share of a mini-batch (TRL's choice). Larger is faster and needs more memory (the planner's logits).
    forward_batch_size: Optional[int] = None
    # Rollouts generate with the LoRA adapter merged into the base weights (no adapter matmuls per decoding step; the
    # base weights are restored exactly afterwards, at the cost of a copy of the merged matrices meanwhile). "auto":
    # with a float32 base only (same samples up to float rounding); in bf16/fp16 the merged weights round differently
    # enough to sample from a slightly other policy than PPO's old log-probs ("always" accepts that). Never with a
    # quantized base. See train.models.merges_for_rollout.
    merge_adapter_for_rollout: Literal["auto", "always", "never"] = "auto"
    save_every_steps: int = 5
    keep_checkpoints: int = 2  # newest complete checkpoints kept on disk; older ones are deleted
    log_every_steps: int = 1


@dataclass
class JudgeConfig:
    """A toxicity classifier the evaluation measures with besides the reward model: one PPO was not trained against,
    so a policy that learned the reward model's blind spots shows up as a disagreement."""

    name: str = ""  # short name for the report (letters, digits, '_', '-', '.'); "" = the last part of the path
    model_name_or_path: str = ""  # hub id or local directory of an AutoModelForSequenceClassification checkpoint
    toxic_label: str = ""  # the class (in the model's id2label) that means toxic, e.g. LABEL_1 or toxic
    revision: Optional[str] = None  # hub branch, tag or commit; None = the default branch
    # As reward.toxicity_activation: "sigmoid" for a multi-label head (unitary/toxic-bert), "softmax" for a
    # single-label one, "auto" reads the model's problem_type.
    toxicity_activation: Literal["auto", "softmax", "sigmoid"] = "auto"
    # What is scored: the summary alone (the dialogue, the same for every system, would dominate a judge's score), or
    # prompt + summary as the reward model scores by default.
    text: Literal["prompt_and_summary", "summary"] = "summary"
    # Placement, as the reward model's: "auto" = each process's own device, or e.g. "cpu", "cuda:7"; or the url of
    # a reward server (python -m rewards.server) serving this classifier.
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = 64
    max_length: Optional[int] = None  # None = the classifier's own limit
    url: Optional[str] = None
    token_env: str = "DETOX_REWARD_TOKEN"
    trust_remote_code: bool = False


# Held-out judges of real runs: classifiers trained on other data (ToxiGen; Jigsaw's multi-label comments) than the
# reward model (Dynabench hate speech).
DEFAULT_JUDGES = (
    JudgeConfig(name="toxigen", model_name_or_path="tomh/toxigen_roberta", toxic_label="LABEL_1"),
    JudgeConfig(name="toxic-bert", model_name_or_path="unitary/toxic-bert", toxic_label="toxic",
                toxicity_activation="sigmoid"),
)


@dataclass
class EvalConfig:
    split: Literal["train", "validation", "test"] = "test"
    max_examples: Optional[int] = None  # None = the full split
    # Greedy decoding for ROUGE by default; set do_sample: true for the original notebook's sampled settings.
    generation: GenerationSettings = field(
        default_factory=lambda: GenerationSettings(do_sample=False, max_new_tokens=200, min_length=0)
    )
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    # Systems compared on identical inputs, as NAME=ADAPTER_DIR; a bare "base" (or NAME=none) is the base model
    # without adapter. "{output_dir}" expands to the run's output_dir. From the command line:
    # --eval.systems base,ppo=runs/tiny/ppo/adapter
    systems: list[str] = field(
        default_factory=lambda: ["base", "sft={output_dir}/sft/adapter", "ppo={output_dir}/ppo/adapter"]
    )
    before: Optional[str] = None  # system whose metrics are the "before" of relative changes; None = the first
    after: Optional[str] = None  # system compared with it; None = the last
    # PPO log.jsonl for reward/KL curves: "auto" = <output_dir>/ppo/log.jsonl when it exists; null = no curves.
    ppo_log: Optional[str] = "auto"
    qualitative_rows: int = 10  # rows at each end of the before/after table sorted by reward improvement
    # Toxicity classifiers besides the reward model (which is always one, "reward_model"). In YAML a list of
    # mappings with JudgeConfig's keys; on the command line a YAML flow list:
    # --eval.judges '[{name: toxigen, model_name_or_path: DIR, toxic_label: LABEL_1}]', or none.
    judges: list[JudgeConfig] = field(default_factory=lambda: [dataclasses.replace(j) for j in DEFAULT_JUDGES])
    # Summaries sampled per prompt with the PPO rollout settings (the rollout section; eval.generation.batch_size
    # prompts' samples per generate call), besides the eval.generation one: expected maximum toxicity and toxicity
    # probability over them, and their distinct-n. Costs k times the generation; the studies use 25. null = none.
    samples_per_prompt: Optional[int] = None
    # Where examples.jsonl, summary.json, report.md and the plots go; "{output_dir}" expands to the run's output_dir.
    # Give each evaluation of a run its own (e.g. {output_dir}/eval-baseline) to keep them all.
    out_dir: str = "{output_dir}/eval"
    # torch CPU threads per process; None = torch's default. 1 is much faster for tiny models on a busy CPU.
    torch_threads: Optional[int] = None


@dataclass
class PlanConfig:
    # What-if hardware of the memory planner (python -m train.plan); training ignores this section. The sizes it
    # plans with are the training keys (model.*, lora.*, ppo.batch_size, rollout.*, data.max_prompt_tokens, reward.*).
    gpus: int = 1  # training GPUs (processes) the PPO job runs on
    zero: int = 0  # DeepSpeed ZeRO stage 1, 2 or 3; 0 = plain data parallel (DDP)
    offload: bool = False  # DeepSpeed CPU offload: optimizer (ZeRO >= 2) and, under ZeRO-3, the parameters
    gradient_checkpointing: bool = False  # keep only each block's input for the backward (see train/plan.py)
    # "separate": the reward classifier on its own device (reward.device cuda:N, or a reward server), not on the
    # training GPUs; "shared": a copy on every training GPU (reward.device auto).
    reward_device: Literal["separate", "shared"] = "separate"
    gpu_mem_gib: float = 80.0  # memory of one GPU, GiB
    margin: float = 0.10  # fraction of gpu_mem_gib kept free for fragmentation and temporaries


@dataclass
class HumanConfig:
    # Blinded human evaluation (python -m eval.human {export,serve,report}); training ignores this section.
    # "{output_dir}" expands to the run's output_dir.
    eval_dir: Optional[str] = None  # export: evaluation output read (directory with examples.jsonl, or the file); null = eval.out_dir
    study_dir: str = "{output_dir}/human"  # export writes the blinded items here; serve and report read them
    n: int = 50  # export: dialogues sampled
    seed: int = 0  # export: sampling, slot-order and annotator-order seed
    systems: Optional[list[str]] = None  # export: systems compared; null = every system in the evaluation
    host: str = "127.0.0.1"  # serve: interface to bind; 127.0.0.1 = this machine only (else set DETOX_HUMAN_TOKEN)
    port: int = 8600  # serve
    db: Optional[str] = None  # serve, report: SQLite answers file; null = <study_dir>/answers.sqlite
    key: Optional[str] = None  # report: un-blinding key; null = <study_dir>/key.json
    report_dir: Optional[str] = None  # report: output directory; null = <study_dir>/report
    # export: which dialogues. "random": a seeded sample of n; "disagreement": the n where the reward model and the
    # held-out judges (eval.judges) disagree most about a summary's toxicity, where a human verdict is worth most.
    select: Literal["random", "disagreement"] = "random"


@dataclass
class ExperimentConfig:
    seed: int = 42
    output_dir: str = "runs/flan-t5-base"
    # The debug hook of SFT and PPO: every process appends, per optimisation step, the examples it trained on and a
    # hash of its trainable weights to <debug_dir>/rank<r>.jsonl (to check sharding and identical weights). null = off.
    debug_dir: Optional[str] = None
    # Experiment trackers of SFT and PPO, besides log.jsonl (train/trackers.py): tensorboard (<stage dir>/tensorboard/),
    # wandb (Weights & Biases: pip install wandb; files under <stage dir>/wandb/; WANDB_MODE etc. apply), both, or
    # none ([] or "none"). On the command line: --trackers tensorboard,wandb / --trackers none.
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    tracker_project: Optional[str] = None  # the wandb project; null = $WANDB_PROJECT if set, else "detox-sum"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)  # PPO sampling
    sft: SFTConfig = field(default_factory=SFTConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    reward_server: RewardServerConfig = field(default_factory=RewardServerConfig)  # python -m rewards.server
    eval: EvalConfig = field(default_factory=EvalConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)  # python -m train.plan
    human: HumanConfig = field(default_factory=HumanConfig)  # python -m eval.human


# ----------------------------------------------------------------------------------------------------
# Loading and validation


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                renamed: Mapping[str, str] | None = None) -> ExperimentConfig:
    """Build an ExperimentConfig from defaults, then the YAML file at `path`, then `overrides`.

    `overrides` are command-line tokens: ["--ppo.learning_rate", "1e-5", "--model.dtype=float32"]. `renamed` adds
    a command's former flags to RENAMED_KEYS (e.g. {"gpus": "plan.gpus"}), so that they fail naming their key.
    """
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    cfg = load_dataclass(ExperimentConfig, raw, overrides, where=str(path) if path else "defaults",
                         renamed={**RENAMED_KEYS, **(renamed or {})})
    validate(cfg)
    return cfg


# Keys that earlier versions had, and what replaced them: named in the error instead of a generic "unknown key".
RENAMED_KEYS = {
    "reward.normalize": "ppo.score_normalization: standardize",
    "reward.clip": "ppo.score_clip",
    "ppo.score_scaling": "ppo.score_normalization: scale",
    "ppo.score_norm": "ppo.score_normalization: standardize",
}


# The range of every numeric setting of every section, checked when a config loads (before any model), whichever
# command reads it: one line naming the key. The rule grammar and the checker live in rewards.config, with the ranges
# of the reward and reward_server sections (the reward server checks those without importing train).
_GENERATION_BOUNDS = {"batch_size": "> 0", "top_k": ">= 0", "top_p": "(0, 1]", "temperature": "> 0",
                      "min_length": ">= 0", "max_new_tokens": "> 0", "max_new_tokens_min": "> 0", "num_beams": "> 0"}
BOUNDS = {
    "seed": "[0, 2147483647]",  # numpy's seeding (accelerate's set_seed) refuses >= 2**32; PPO adds the process index
    "data.min_dialogue_chars": ">= 0", "data.max_dialogue_chars": "> 0", "data.max_prompt_tokens": "> 0", "data.max_summary_tokens": "> 0",
    "data.train_fraction": "(0, 1)", "data.max_examples": "> 0",
    "model.value_head_dropout": "[0, 1)",
    "lora.r": "> 0", "lora.alpha": "> 0", "lora.dropout": "[0, 1)",
    **{f"rollout.{k}": v for k, v in _GENERATION_BOUNDS.items()},
    **{f"eval.generation.{k}": v for k, v in _GENERATION_BOUNDS.items()},
    **{f"sft.{k}": "> 0" for k in ("learning_rate", "batch_size", "gradient_accumulation_steps", "num_epochs",
                                   "max_steps", "max_grad_norm", "eval_every_steps", "early_stopping_patience",
                                   "save_every_steps", "keep_checkpoints", "log_every_steps")},
    "sft.warmup_ratio": "[0, 1)", "sft.weight_decay": ">= 0", "sft.eval_rouge_examples": ">= 0",
    **{f"ppo.{k}": "> 0" for k in ("learning_rate", "batch_size", "mini_batch_size", "gradient_accumulation_steps",
                                   "ppo_epochs", "steps", "kl_target", "kl_horizon", "cliprange", "cliprange_value",
                                   "score_clip", "ratio_threshold", "max_grad_norm", "forward_batch_size",
                                   "save_every_steps", "keep_checkpoints", "log_every_steps")},
    "rollout.samples_per_prompt": ">= 1",
    "ppo.init_kl_coef": ">= 0", "ppo.gamma": "[0, 1]", "ppo.lam": "[0, 1]", "ppo.vf_coef": ">= 0",
    **{f"reward.{k}": v for k, v in REWARD_BOUNDS.items()},
    **{f"reward_server.{k}": v for k, v in REWARD_SERVER_BOUNDS.items()},
    "eval.max_examples": "> 0", "eval.bootstrap_samples": "> 0", "eval.confidence": "(0, 1)",
    "eval.qualitative_rows": "> 0", "eval.torch_threads": "> 0", "eval.samples_per_prompt": ">= 1",
    # ">= 1" rather than "> 0" (the same integers): these two have always said "at least 1".
    "plan.gpus": ">= 1", "plan.zero": "{0, 1, 2, 3}", "plan.gpu_mem_gib": "> 0", "plan.margin": "[0, 1)",
    "human.n": ">= 1", "human.seed": ">= 0", "human.port": "[1, 65535]",
}


def expand_output_dir(path: str, output_dir: str) -> str:
    """A path setting with "{output_dir}" replaced by the run's output_dir (eval.systems, eval.out_dir, human.*)."""
    return path.replace("{output_dir}", output_dir)


def validate(cfg: ExperimentConfig) -> None:
    """Ranges (BOUNDS), then cross-field checks that types alone cannot express."""
    check_bounds(cfg, BOUNDS)
    d, p = cfg.data, cfg.ppo
    if not d.min_dialogue_chars < d.max_dialogue_chars:
        raise ConfigError(
            f"data.min_dialogue_chars ({d.min_dialogue_chars}) must be below data.max_dialogue_chars "
            f"({d.max_dialogue_chars})"
        )
    if "{dialogue}" not in d.prompt_template:
        raise ConfigError("data.prompt_template must contain the placeholder {dialogue}")
    if p.batch_size % p.mini_batch_size != 0:
        raise ConfigError(
            f"ppo.batch_size ({p.batch_size}) must be a multiple of ppo.mini_batch_size ({p.mini_batch_size})"
        )
    k = cfg.rollout.samples_per_prompt
    if p.advantage_estimator in ("rloo", "group") and k < 2:
        raise ConfigError(f"ppo.advantage_estimator {p.advantage_estimator} compares the summaries of a prompt with "
                          f"each other: set rollout.samples_per_prompt to 2 or more (it is {k})")
    if p.advantage_estimator in ("rloo", "group"):
        ignored = [key for key in ("gamma", "lam", "vf_coef", "whiten_rewards", "cliprange_value")
                   if getattr(p, key) != getattr(PPOConfig(), key)]
        if ignored:
            raise ConfigError(f"{', '.join('ppo.' + key for key in ignored)} set, but ppo.advantage_estimator "
                              f"{p.advantage_estimator} has no value head or per-token returns to use them: remove them "
                              "(they shape gae only)")
    if p.batch_size % k:
        raise ConfigError(f"ppo.batch_size ({p.batch_size}) counts summaries, rollout.samples_per_prompt ({k}) per "
                          f"prompt: make it a multiple of {k}")
    if k > 1 and not cfg.rollout.do_sample:
        raise ConfigError(f"rollout.samples_per_prompt {k} needs rollout.do_sample: true (greedy decoding would give "
                          "the same summary k times)")
    for name, g in (("rollout", cfg.rollout), ("eval.generation", cfg.eval.generation)):
        if g.max_new_tokens_min is not None and not g.max_new_tokens_min < g.max_new_tokens:
            raise ConfigError(f"{name}.max_new_tokens_min must be below {name}.max_new_tokens")
    # transformers would decode uncompiled without a word: bitsandbytes bases are not compileable, beam search never is.
    if cfg.rollout.compile and cfg.model.quantization:
        raise ConfigError(f"rollout.compile: transformers cannot compile a {cfg.model.quantization} (bitsandbytes) base "
                          "(model.quantization): turn one of them off")
    if cfg.rollout.compile and cfg.rollout.num_beams > 1:
        raise ConfigError("rollout.compile: transformers' beam search never runs the compiled decoder step: set "
                          "rollout.num_beams to 1 or rollout.compile to false")
    cfg.trackers = check_trackers(cfg.trackers)
    check_judges(cfg.eval.judges)

    check_reward(cfg.reward)  # its ranges are in BOUNDS already; this adds its other checks
    check_reward_server(cfg.reward_server)
    # plan.offload needs ZeRO >= 2: checked by train.plan (PlanInputs.check), the section's only reader.


# Ranges of a judge's numeric keys (checked per list entry, as eval.judges[i].KEY).
JUDGE_BOUNDS = {key: REWARD_BOUNDS[key] for key in ("batch_size", "max_length")}  # a judge is scored like the reward model
REWARD_MODEL_JUDGE = "reward_model"  # the reward classifier's name among the judges of a report


def judge_name(judge: JudgeConfig) -> str:
    """The judge's name: its own, or the last part of its path (tomh/toxigen_roberta -> toxigen_roberta)."""
    return judge.name or judge.model_name_or_path.rstrip("/").rsplit("/", 1)[-1]


def check_judges(judges: list[JudgeConfig]) -> None:
    """Each judge names a classifier and its toxic label, within range, under a name of its own."""
    seen: set[str] = set()
    for i, judge in enumerate(judges):
        key = f"eval.judges[{i}]"
        for required in ("model_name_or_path", "toxic_label"):
            if not getattr(judge, required):
                raise ConfigError(f"{key}.{required} is missing: every judge names a classifier (hub id or directory) "
                                  "and the label that means toxic, e.g. {model_name_or_path: tomh/toxigen_roberta, "
                                  "toxic_label: LABEL_1}")
        check_bounds(judge, JUDGE_BOUNDS, f"{key}.")
        name = judge_name(judge)
        if not re.match(r"^[A-Za-z0-9][\w.-]*$", name):
            raise ConfigError(f"{key}.name {name!r} must be letters, digits, '_', '-' or '.' (set {key}.name)")
        if name == REWARD_MODEL_JUDGE:
            raise ConfigError(f"{key}.name {name!r} is the reward model's place in the report: choose another name "
                              "(the reward model is always a judge; list only the held-out ones)")
        if name in seen:
            raise ConfigError(f"eval.judges names {name!r} twice: give each judge its own name ({key}.name)")
        seen.add(name)
        if not judge.token_env:
            raise ConfigError(f"{key}.token_env must name an environment variable")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loadable again with load_config)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

