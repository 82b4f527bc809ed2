"""Reward settings, reward-server settings, and the config grammar every command uses.

The grammar (`--config FILE` plus `--section.key VALUE` overrides onto a tree of dataclasses, strict types, one
clear `ConfigError` per mistake) lives here, at the bottom of the import order (eval -> train -> rewards), because
the reward server needs it and must not import `train`. `train.config.load_config` applies it to the whole
`ExperimentConfig`; `load_server_config` applies it to the two sections the server reads (`reward`,
`reward_server`), ignoring the other sections of a training recipe (`RECIPE_KEYS`) and rejecting any other key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, TypeVar

import yaml

from rewards.errors import ConfigError

T = TypeVar("T")


@dataclass
class RewardConfig:
    # Hate-speech classifier: hub id or local directory. Labels are looked up by name in its id2label.
    model_name_or_path: str = "facebook/roberta-hate-speech-dynabench-r4-target"
    revision: Optional[str] = None  # hub branch, tag or commit of the classifier; None = the default branch
    reward_label: str = "nothate"  # reward = raw logit of this class (the original notebook's choice)
    toxic_label: str = "hate"  # toxicity = the probability of this class (see toxicity_activation)
    # How that probability is read from the logits: "softmax" over the classes (a single-label head, as the default
    # model), "sigmoid" of the class's own logit (a multi-label head, e.g. unitary/toxic-bert), or "auto": sigmoid
    # when the model's config says problem_type multi_label_classification, else softmax.
    toxicity_activation: Literal["auto", "softmax", "sigmoid"] = "auto"
    # What is scored: the original notebook scored prompt + summary; "summary" scores the summary alone.
    text: Literal["prompt_and_summary", "summary"] = "prompt_and_summary"
    # Placement: "auto" = each process's own device (its GPU by LOCAL_RANK, or the CPU); or an explicit one
    # such as "cpu" or "cuda:7", which keeps the classifier off the training GPUs.
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = 64
    max_length: Optional[int] = None  # None = the classifier's own limit
    # A reward server (python -m rewards.server) instead of an in-process classifier.
    url: Optional[str] = None
    token_env: str = "DETOX_REWARD_TOKEN"  # bearer token is read from this environment variable, never from YAML
    timeout_s: float = 30.0
    max_retries: int = 3
    trust_remote_code: bool = False


# Keys of the reward section the server uses; the others (url, text, timeout_s, max_retries) belong to its clients.
SERVED_REWARD_KEYS = ("model_name_or_path", "revision", "reward_label", "toxic_label", "toxicity_activation", "device", "dtype", "batch_size", "max_length",
                      "trust_remote_code", "token_env")
CLIENT_REWARD_KEYS = tuple(f.name for f in dataclasses.fields(RewardConfig) if f.name not in SERVED_REWARD_KEYS)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class RewardServerConfig:
    # How `python -m rewards.server` serves the classifier of the reward section (its batch_size = texts per
    # model call). Training and evaluation ignore this section.
    host: str = "127.0.0.1"  # address to bind; 127.0.0.1 = this machine only
    port: int = 8500
    max_wait_ms: float = 5.0  # how long a batch waits for more requests before the model runs
    max_queue: int = 1024  # requests waiting for the model; beyond that the server answers 503
    # Texts one request may carry and characters per text; /health reports both and clients split to fit.
    max_texts_per_request: int = 256
    max_chars: int = 20000
    torch_threads: Optional[int] = None  # CPU threads for the model; null = torch's choice (1 helps on busy CPUs)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # The bearer token is read from the environment variable reward.token_env: the default one may be unset (no
    # token), any other must be set. true = refuse to start without a token (always advisable when host is not a
    # loopback address).
    require_token: bool = False


@dataclass
class ServerRecipe:
    """What `python -m rewards.server` reads: the classifier (reward) and how to serve it (reward_server)."""

    reward: RewardConfig = field(default_factory=RewardConfig)
    reward_server: RewardServerConfig = field(default_factory=RewardServerConfig)


# The top-level keys of a training recipe: the fields of train.config.ExperimentConfig, in order (rewards must not
# import train; tests/rewards/test_config.py keeps the two equal). The server reads two of them and rejects any other.
RECIPE_KEYS = ("seed", "output_dir", "debug_dir", "trackers", "tracker_project", "data", "model", "lora", "rollout",
               "sft", "ppo", "reward", "reward_server", "eval", "plan", "human")


# The range of every numeric setting of the two sections (train.config.BOUNDS includes them, prefixed), checked when a
# config loads, before any model. A rule is "> x", ">= x", an interval such as "[0, 1)", or a set such as "{0, 1, 2}";
# nan and infinities are refused everywhere and a null (where the type allows one) is always accepted.
REWARD_BOUNDS = {"batch_size": "> 0", "max_length": "> 0", "timeout_s": "> 0", "max_retries": ">= 0"}
REWARD_SERVER_BOUNDS = {"port": "[1, 65535]", "max_wait_ms": ">= 0", "max_queue": "> 0", "max_texts_per_request": "> 0",
                        "max_chars": "> 0", "torch_threads": "> 0"}


def _within(value: float, rule: str) -> bool:
    """Whether the finite number `value` satisfies `rule` (the grammar above)."""
    if rule[0] == "{":
        return value in {float(x) for x in rule[1:-1].split(",")}
    if rule[0] in "[(":
        low, high = (float(x) for x in rule[1:-1].split(","))
        above = value >= low if rule[0] == "[" else value > low
        below = value <= high if rule[-1] == "]" else value < high
        return above and below
    op, bound = rule.split()
    return value >= float(bound) if op == ">=" else value > float(bound)


def _finite(value: float) -> bool:
    return isinstance(value, int) or math.isfinite(value)  # math.isfinite overflows on a huge int


def _rule_words(rule: str, integer: bool) -> str:
    """`rule` as the end of "KEY must be ...", in the words the commands have always used."""
    if rule == "> 0":
        return "a positive integer" if integer else "positive"
    if rule[0] == "{":
        return f"one of {', '.join(x.strip() for x in rule[1:-1].split(','))}"
    if rule[0] == "[" and rule[-1] == "]":
        low, high = (x.strip() for x in rule[1:-1].split(","))
        return f"between {low} and {high}"
    if rule[0] in "[(":
        return f"in {rule}"
    op, bound = rule.split()
    if op == ">=":
        return f"{bound} or more" if bound == "0" else f"at least {bound}"
    return f"above {bound}"


def check_bounds(obj: Any, bounds: Mapping[str, str], prefix: str = "") -> None:
    """Every (dotted) key of `bounds` within its rule on dataclass `obj`; one ConfigError naming the first that is not."""
    for key, rule in bounds.items():
        owner, name = obj, key
        while "." in name:
            section, name = name.split(".", 1)
            owner = getattr(owner, section)
        value = getattr(owner, name)
        if value is None or (_finite(value) and _within(value, rule)):
            continue
        hint = typing.get_type_hints(type(owner))[name]
        types_ = set(typing.get_args(hint) or (hint,))
        words = _rule_words(rule, int in types_) + ("" if _finite(value) else " and finite")
        raise ConfigError(f"{prefix}{key} must be {words}{' or null' if type(None) in types_ else ''}, got {value}")


def check_reward(r: RewardConfig, where: str = "reward") -> None:
    """Value checks of the reward section: REWARD_BOUNDS, then what neither types nor ranges express."""
    check_bounds(r, REWARD_BOUNDS, f"{where}.")
    if not r.token_env:
        raise ConfigError(f"{where}.token_env must name an environment variable")


def check_reward_server(s: RewardServerConfig, where: str = "reward_server") -> None:
    """Value checks of the reward_server section: REWARD_SERVER_BOUNDS, then what neither types nor ranges express."""
    check_bounds(s, REWARD_SERVER_BOUNDS, f"{where}.")
    if not s.host:
        raise ConfigError(f"{where}.host must not be empty")


def load_server_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                       renamed: Mapping[str, str] | None = None) -> ServerRecipe:
    """The server's settings: defaults, then the reward and reward_server sections of the YAML at `path` (its other
    sections belong to training and are ignored; a top-level key no training recipe has is an error), then
    `overrides` (only the reward.* keys the server uses, and reward_server.*)."""
    raw = read_yaml(path) if path is not None else {}
    for key in raw:
        if key not in RECIPE_KEYS:
            raise ConfigError(f"{path}: unknown key '{key}'{_suggest(str(key), list(RECIPE_KEYS), '')}")
    for key, _value in parse_overrides(overrides or [], renamed):
        section, _, name = key.partition(".")
        if section == "reward" and name in CLIENT_REWARD_KEYS:
            raise ConfigError(f"--reward.{name} is a client setting (training and evaluation read it, the server does "
                              "not): leave it off the server's command line")
    sections = {f.name for f in dataclasses.fields(ServerRecipe)}
    cfg = load_dataclass(ServerRecipe, {k: v for k, v in raw.items() if k in sections}, overrides,
                         where=str(path) if path else "defaults", renamed=renamed)
    check_reward(cfg.reward)
    check_reward_server(cfg.reward_server)
    return cfg


# ----------------------------------------------------------------------------------------------------
# The grammar: YAML mapping -> dataclass tree, then --section.key VALUE overrides


def load_dataclass(cls: type[T], raw: dict[str, Any], overrides: list[str] | None = None, where: str = "defaults",
                   renamed: Mapping[str, str] | None = None) -> T:
    """Build dataclass `cls` from `raw` (a parsed YAML mapping), then apply command-line `overrides`.

    `overrides` are tokens such as ["--ppo.learning_rate", "1e-5", "--model.dtype=float32"]. `renamed` maps keys
    that no longer exist (dotted, e.g. "reward.clip", or an old flag such as "gpus") to what replaced them, so the
    error names the replacement instead of a generic "unknown key".
    """
    renamed = renamed or {}
    cfg = build_dataclass(cls, raw, where=where, renamed=renamed)
    for key, value in parse_overrides(overrides or [], renamed):
        set_by_path(cfg, key, value, renamed)
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


def build_dataclass(cls: type, raw: Any, where: str, prefix: str = "", renamed: Mapping[str, str] | None = None):
    """Instantiate dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    renamed = renamed or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            if f"{prefix}{key}" in renamed:
                raise ConfigError(f"{where}: '{prefix}{key}' was replaced: use {renamed[prefix + key]}")
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'{_suggest(key, names, prefix)}")
        kwargs[key] = coerce(value, hints[key], f"{prefix}{key}", where, renamed)
    return cls(**kwargs)


def coerce(value: Any, tp: Any, key: str, where: str, renamed: Mapping[str, str] | None = None) -> Any:
    """Check `value` against type `tp`, converting command-line strings where unambiguous."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where, prefix=f"{key}.", renamed=renamed)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return coerce(value, non_none[0], key, where, renamed)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: '{key}' must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin is list:
        (item_tp,) = args
        if isinstance(value, str) and dataclasses.is_dataclass(item_tp):  # command line: a YAML flow list of mappings
            value = _flow_yaml(value, key)
        elif isinstance(value, str):  # command line: "q,v" or "[q, v]"
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        return [coerce(v, item_tp, f"{key}[{i}]", where, renamed) for i, v in enumerate(value)]
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


def _flow_yaml(text: str, key: str) -> Any:
    """A list of mappings written on the command line, e.g. '[{name: a, model_name_or_path: DIR}]'; "none" = []."""
    if text.strip().lower() in ("none", "null", "[]", ""):
        return []
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"--{key} takes a YAML list of mappings, e.g. --{key} '[{{name: a, key: value}}]', "
                          f"got {text!r}")
    return value


def parse_overrides(tokens: list[str], renamed: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """["--a.b", "1", "--c=2"] -> [("a.b", "1"), ("c", "2")]; a key in `renamed` stops here, value or not."""
    renamed = renamed or {}
    pairs, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"unexpected argument {tok!r}: overrides look like --section.key value")
        key = tok[2:]
        name = key.split("=", 1)[0].replace("-", "_")
        if name in renamed:
            raise ConfigError(f"--{key.split('=', 1)[0]} was replaced: use --{renamed[name].replace(': ', ' ')}")
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


def set_by_path(cfg: Any, dotted: str, value: Any, renamed: Mapping[str, str] | None = None) -> None:
    """Set `cfg.a.b.c = value` (type-checked), with a clear error for an unknown key."""
    renamed = renamed or {}
    parts = dotted.split(".")
    obj, prefix = cfg, ""
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            if f"{prefix}{part}" in renamed:
                raise ConfigError(f"--{prefix}{part} was replaced: use --{renamed[prefix + part].replace(': ', ' ')}")
            raise ConfigError(f"unknown option --{prefix}{part}{_suggest(part, names, prefix, cli=True)}")
        if depth == len(parts) - 1:
            tp = typing.get_type_hints(type(obj))[part]
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"--{dotted} is a section; set one of its keys, e.g. --{dotted}.{dataclasses.fields(tp)[0].name}")
            setattr(obj, part, coerce(value, tp, dotted, "command line", renamed))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"--{prefix}{part} is not a section; did you mean --{prefix}{part} VALUE?")
            prefix += part + "."


def section_help(section: str, settings: Any, only: tuple[str, ...] | None = None) -> str:
    """The keys of one section as `--section.key (default VALUE)` lines, for an --help epilog."""
    return "\n".join(
        f"  --{section}.{f.name} (default {_show(getattr(settings, f.name))})"
        for f in dataclasses.fields(settings)
        if (only is None or f.name in only) and not dataclasses.is_dataclass(getattr(settings, f.name))
    )


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value)) or "[]"
    return str(value)


def _suggest(key: str, names: list[str], prefix: str, cli: bool = False) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    dash = "--" if cli else ""
    if close:
        return f"; did you mean '{dash}{prefix}{close[0]}'?"
    return f"; valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}"
