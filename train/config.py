"""Experiment configuration: dataclasses loaded from YAML, with command-line overrides.

Every default lives here, once. A recipe in `configs/` overrides some of them and the command line
overrides the recipe:

    python -m eval.baseline --config configs/tiny.yaml --eval.max_examples 20 --model.dtype=float32

Unknown keys, values of the wrong type and missing files raise `ConfigError` with one message that
says what is wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from rewards.config import RewardConfig
from train.atomic import write_text
from train.errors import ConfigError

PROMPT_TEMPLATE = "\nSummarize the following conversation.\n\n{dialogue}\n\nSummary:\n"


@dataclass
class DataConfig:
    # Hub id (knkarthick/dialogsum) or a local directory in the Hugging Face CSV layout
    # (train/validation/test.csv) or the original cylnlp JSONL layout (dialogsum.{train,dev,test}.jsonl).
    path: str = "knkarthick/dialogsum"
    # Keep dialogues with min < len(dialogue) <= max characters, as the reference notebook did.
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
    top_k: int = 0  # 0 = no top-k filtering (the reference's sampling)
    top_p: float = 1.0
    temperature: float = 1.0
    min_length: int = 5
    max_new_tokens: int = 400
    # When set, each rollout batch draws max_new_tokens uniformly from [max_new_tokens_min, max_new_tokens)
    # like the reference notebook's LengthSampler(100, 400). None = always max_new_tokens.
    max_new_tokens_min: Optional[int] = None
    num_beams: int = 1


@dataclass
class SFTConfig:
    # Defaults follow the reference notebook's adapter training (AdamW, lr 1e-3, one epoch).
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
    # Defaults reproduce the reference workflow; the rest are the classic TRL PPOTrainer's defaults.
    learning_rate: float = 1.41e-5
    batch_size: int = 16  # global rollout batch
    mini_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    ppo_epochs: int = 1
    steps: int = 10  # PPO steps (the reference ran 10)
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
    # Score shaping before the KL penalty (off in the reference workflow: raw nothate logits). "scale" divides by
    # the running std of all scores seen (TRL's use_score_scaling), "standardize" also subtracts the running mean
    # (TRL's use_score_norm); score_clip then clips to [-score_clip, score_clip].
    score_normalization: Literal["none", "scale", "standardize"] = "none"
    score_clip: Optional[float] = None
    ratio_threshold: float = 10.0
    max_grad_norm: Optional[float] = None
    # TRL 0.11.4 masks out the first generated token of encoder-decoder responses (an off-by-one); true
    # reproduces that exactly (differential test), false (default) trains on every response token.
    trl_first_token_mask: bool = False
    # The KL reference. "base": the base model with the adapter switched off (the reference workflow).
    # "initial_adapter": a frozen second copy of the adapter PPO starts from (model.adapter, e.g. the SFT
    # adapter), as the notebook's create_reference_model did, so the KL measures drift from the SFT policy.
    # Either way one base model is in memory; without model.adapter both are the same model.
    reference: Literal["base", "initial_adapter"] = "base"
    # Rows per no-grad forward pass for the old and reference log-probs, per process; null = this process's
    # share of a mini-batch (TRL's choice). Larger is faster and needs more memory (the planner's logits).
    forward_batch_size: Optional[int] = None
    save_every_steps: int = 5
    keep_checkpoints: int = 2  # newest complete checkpoints kept on disk; older ones are deleted
    log_every_steps: int = 1


@dataclass
class EvalConfig:
    split: Literal["train", "validation", "test"] = "test"
    max_examples: Optional[int] = None  # None = the full split
    # Greedy decoding for ROUGE by default; set do_sample: true for the reference's sampled settings.
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
    # torch CPU threads per process; None = torch's default. 1 is much faster for tiny models on a busy CPU.
    torch_threads: Optional[int] = None


@dataclass
class ExperimentConfig:
    seed: int = 42
    output_dir: str = "runs/flan-t5-base"
    # The debug hook of SFT and PPO: every process appends, per optimisation step, the examples it trained on and a
    # hash of its trainable weights to <debug_dir>/rank<r>.jsonl (to check sharding and identical weights). null = off.
    debug_dir: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    rollout: GenerationSettings = field(default_factory=GenerationSettings)  # PPO sampling
    sft: SFTConfig = field(default_factory=SFTConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------------
# Loading and validation


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Build an ExperimentConfig from defaults, then the YAML file at `path`, then `overrides`.

    `overrides` are command-line tokens: ["--ppo.learning_rate", "1e-5", "--model.dtype=float32"].
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
    cfg = build_dataclass(ExperimentConfig, raw, where=str(path) if path else "defaults")
    for key, value in parse_overrides(overrides or []):
        set_by_path(cfg, key, value)
    validate(cfg)
    return cfg


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        available = sorted(str(x) for x in Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []
        hint = f" Available recipes: {', '.join(available)}." if available else ""
        raise ConfigError(f"config file not found: {path}.{hint}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must contain a mapping of sections, got {type(raw).__name__}")
    return raw


# Keys that earlier versions had, and what replaced them: named in the error instead of a generic "unknown key".
RENAMED_KEYS = {
    "reward.normalize": "ppo.score_normalization: standardize",
    "reward.clip": "ppo.score_clip",
    "ppo.score_scaling": "ppo.score_normalization: scale",
    "ppo.score_norm": "ppo.score_normalization: standardize",
}


def build_dataclass(cls: type, raw: Any, where: str, prefix: str = ""):
    """Instantiate dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            if f"{prefix}{key}" in RENAMED_KEYS:
                raise ConfigError(f"{where}: '{prefix}{key}' was replaced: use {RENAMED_KEYS[prefix + key]}")
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'{_suggest(key, names, prefix)}")
        kwargs[key] = coerce(value, hints[key], f"{prefix}{key}", where)
    return cls(**kwargs)


def coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against type `tp`, converting command-line strings where unambiguous."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return coerce(value, non_none[0], key, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: '{key}' must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin is list:
        (item_tp,) = args
        if isinstance(value, str):  # command line: "q,v" or "[q, v]"
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        return [coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in this module, not user input


def parse_overrides(tokens: list[str]) -> list[tuple[str, str]]:
    """["--a.b", "1", "--c=2"] -> [("a.b", "1"), ("c", "2")]."""
    pairs, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"unexpected argument {tok!r}: overrides look like --section.key value")
        key = tok[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens):
                raise ConfigError(f"option --{key} needs a value")
            value = tokens[i + 1]
            i += 2
        pairs.append((key.replace("-", "_"), value))
    return pairs


def set_by_path(cfg: Any, dotted: str, value: Any) -> None:
    """Set `cfg.a.b.c = value` (type-checked), with a clear error for an unknown key."""
    parts = dotted.split(".")
    obj, prefix = cfg, ""
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            if f"{prefix}{part}" in RENAMED_KEYS:
                raise ConfigError(f"--{prefix}{part} was replaced: use --{RENAMED_KEYS[prefix + part].replace(': ', ' ')}")
            raise ConfigError(f"unknown option --{prefix}{part}{_suggest(part, names, prefix, cli=True)}")
        if depth == len(parts) - 1:
            tp = typing.get_type_hints(type(obj))[part]
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"--{dotted} is a section; set one of its keys, e.g. --{dotted}.{dataclasses.fields(tp)[0].name}")
            setattr(obj, part, coerce(value, tp, dotted, "command line"))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"--{prefix}{part} is not a section; did you mean --{prefix}{part} VALUE?")
            prefix += part + "."


def validate(cfg: ExperimentConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    d, p = cfg.data, cfg.ppo
    if not 0 <= d.min_dialogue_chars < d.max_dialogue_chars:
        raise ConfigError(
            f"data.min_dialogue_chars ({d.min_dialogue_chars}) must be >= 0 and below "
            f"data.max_dialogue_chars ({d.max_dialogue_chars})"
        )
    if not 0.0 < d.train_fraction < 1.0:
        raise ConfigError(f"data.train_fraction must be between 0 and 1, got {d.train_fraction}")
    if "{dialogue}" not in d.prompt_template:
        raise ConfigError("data.prompt_template must contain the placeholder {dialogue}")
    positive = ("learning_rate", "batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs", "steps",
                "save_every_steps", "keep_checkpoints", "log_every_steps")
    for name in positive:
        if not getattr(p, name) > 0:
            raise ConfigError(f"ppo.{name} must be positive, got {getattr(p, name)}")
    if p.score_clip is not None and not p.score_clip > 0:
        raise ConfigError(f"ppo.score_clip must be positive or null, got {p.score_clip}")
    if p.batch_size % p.mini_batch_size != 0:
        raise ConfigError(
            f"ppo.batch_size ({p.batch_size}) must be a multiple of ppo.mini_batch_size ({p.mini_batch_size})"
        )
    if p.forward_batch_size is not None and p.forward_batch_size < 1:
        raise ConfigError(f"ppo.forward_batch_size must be positive or null, got {p.forward_batch_size}")
    for name, g in (("rollout", cfg.rollout), ("eval.generation", cfg.eval.generation)):
        if g.max_new_tokens_min is not None and not 0 < g.max_new_tokens_min < g.max_new_tokens:
            raise ConfigError(f"{name}.max_new_tokens_min must be between 0 and {name}.max_new_tokens")
    for name, value in (("data.max_examples", d.max_examples), ("eval.max_examples", cfg.eval.max_examples)):
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be positive or null, got {value}")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loadable again with load_config)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _suggest(key: str, names: list[str], prefix: str, cli: bool = False) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    dash = "--" if cli else ""
    if close:
        return f"; did you mean '{dash}{prefix}{close[0]}'?"
    return f"; valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}"
