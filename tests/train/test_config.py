"""Config loading: YAML recipes, command-line overrides, and one clear error for each kind of bad input."""

import dataclasses
import re
import sys

import pytest

from train.config import ExperimentConfig, load_config, save_config
from train.errors import ConfigError


def test_flan_t5_base_recipe_reproduces_the_original_notebook(repo_root):
    cfg = load_config(repo_root / "configs/flan_t5_base.yaml")
    assert (cfg.data.path, cfg.data.min_dialogue_chars, cfg.data.max_dialogue_chars) == ("knkarthick/dialogsum", 200, 1000)
    assert cfg.data.prompt_template == "\nSummarize the following conversation.\n\n{dialogue}\n\nSummary:\n"
    assert cfg.data.train_fraction == 0.8
    assert (cfg.model.name_or_path, cfg.model.dtype, cfg.model.value_head_dropout) == ("google/flan-t5-base", "bfloat16", 0.1)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules, cfg.lora.dropout, cfg.lora.bias) == (32, 32, ["q", "v"], 0.05, "none")
    assert (cfg.ppo.learning_rate, cfg.ppo.batch_size, cfg.ppo.mini_batch_size, cfg.ppo.ppo_epochs) == (1.41e-5, 16, 4, 1)
    assert (cfg.rollout.top_k, cfg.rollout.top_p, cfg.rollout.min_length, cfg.rollout.do_sample) == (0, 1.0, 5, True)
    assert cfg.reward.model_name_or_path == "facebook/roberta-hate-speech-dynabench-r4-target"
    assert (cfg.reward.reward_label, cfg.reward.toxic_label) == ("nothate", "hate")


def test_defaults_are_the_original_notebook_settings(repo_root):
    """One source of truth: the dataclass defaults already are the original notebook's settings."""
    recipe = load_config(repo_root / "configs/flan_t5_base.yaml")
    defaults = ExperimentConfig()
    for section in ("data", "model", "lora", "ppo", "reward"):
        assert getattr(recipe, section) == getattr(defaults, section), section


def test_tiny_recipe_loads_and_points_at_tiny_artifacts(repo_root):
    cfg = load_config(repo_root / "configs/tiny.yaml")
    assert cfg.model.name_or_path.startswith("artifacts/tiny/")
    assert cfg.reward.model_name_or_path.startswith("artifacts/tiny/")
    assert cfg.model.dtype == "float32"


def test_command_line_overrides_are_typed(repo_root):
    cfg = load_config(
        repo_root / "configs/tiny.yaml",
        ["--ppo.learning_rate", "1e-5", "--lora.target_modules=q,k,v", "--rollout.do_sample", "false",
         "--model.adapter", "some/dir", "--data.max_examples", "null", "--eval.generation.max_new_tokens=7"],
    )
    assert cfg.ppo.learning_rate == 1e-5 and isinstance(cfg.ppo.learning_rate, float)
    assert cfg.lora.target_modules == ["q", "k", "v"]
    assert cfg.rollout.do_sample is False
    assert cfg.model.adapter == "some/dir"
    assert cfg.data.max_examples is None
    assert cfg.eval.generation.max_new_tokens == 7


def test_yaml_float_without_dot_is_accepted(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("ppo:\n  learning_rate: 1e-5\n")  # PyYAML reads this as the string '1e-5'
    assert load_config(p).ppo.learning_rate == 1e-5


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("ppo:\n  learnin_rate: 0.1\n", "did you mean 'ppo.learning_rate'"),
        ("ppo:\n  batch_size: sixteen\n", "'ppo.batch_size' must be an integer"),
        ("model:\n  dtype: int8\n", "'model.dtype' must be one of"),
        ("lora: 3\n", "'lora' must be a mapping"),
        ("rollout:\n  do_sample: maybe\n", "'rollout.do_sample' must be true or false"),
        ("nonsense: 1\n", "unknown key 'nonsense'"),
        ("- a\n- b\n", "must contain a mapping"),
        ("ppo: [unclosed\n", "not valid YAML"),
        ("ppo:\n  batch_size: 10\n  mini_batch_size: 4\n", "multiple of ppo.mini_batch_size"),
        ("data:\n  prompt_template: 'Summarize: {text}'\n", "placeholder {dialogue}"),
        ("data:\n  train_fraction: 1.5\n", "data.train_fraction must be in"),
    ],
)
def test_bad_yaml_gives_one_clear_error(tmp_path, yaml_text, message):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("{", r"\{").replace("}", r"\}")):
        load_config(p)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--ppo.learnin_rate", "1"], "did you mean '--ppo.learning_rate'"),
        (["--ppo.batch_size", "1.5"], "must be an integer"),
        (["--ppo"], "needs a value"),
        (["--ppo", "3"], "is a section"),
        (["stray"], "unexpected argument 'stray'"),
        (["--seed.x", "1"], "not a section"),
        (["--ppo.score_clip", "-1"], "ppo.score_clip must be positive or null"),
        (["--ppo.mini_batch_size", "0"], "ppo.mini_batch_size must be a positive integer, got 0"),
        (["--reward.normalize", "true"], "--reward.normalize was replaced: use --ppo.score_normalization standardize"),
        (["--trackers", "tensorboard,mlflow"], "unknown tracker 'mlflow'; use tensorboard, wandb, both"),
        (["--trackers", "none,wandb"], "'none' cannot be combined with other trackers"),
        (["--ppo.advantage_estimator", "rloo"], "set rollout.samples_per_prompt to 2 or more \\(it is 1\\)"),
        (["--ppo.advantage_estimator", "grpo"], "ppo.advantage_estimator"),
        (["--rollout.samples_per_prompt", "3"], "ppo.batch_size \\(16\\) counts summaries.*multiple of 3"),
        (["--rollout.samples_per_prompt", "4", "--rollout.do_sample", "false"], "needs rollout.do_sample: true"),
        (["--rollout.samples_per_prompt", "0"], "rollout.samples_per_prompt must be"),
        (["--ppo.kl_penalty", "both"], "ppo.kl_penalty"),
        (["--ppo.advantage_estimator", "group", "--rollout.samples_per_prompt", "4", "--ppo.vf_coef", "0.5"],
         "ppo.vf_coef set, but ppo.advantage_estimator group has no value head"),
        (["--model.quantization", "4bit", "--rollout.compile", "true"],
         "rollout.compile: transformers cannot compile a 4bit \\(bitsandbytes\\) base"),
        (["--rollout.num_beams", "2", "--rollout.compile", "true"], "beam search never runs the compiled"),
        (["--eval.generation.compile", "true"], "unknown option --eval.generation.compile"),
    ],
)
def test_bad_overrides_give_one_clear_error(repo_root, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(repo_root / "configs/tiny.yaml", overrides)


@pytest.mark.parametrize("value, expected", [("tensorboard,wandb", ["tensorboard", "wandb"]), ("none", []), ("[]", []),
                                             ("wandb,wandb", ["wandb"])])
def test_trackers_take_a_list_or_none(repo_root, value, expected):
    assert ExperimentConfig().trackers == ["tensorboard"]
    assert load_config(repo_root / "configs/tiny.yaml", ["--trackers", value]).trackers == expected


def test_wandb_tracker_without_wandb_installed_says_how_to_install_it_before_any_model_loads(repo_root, tmp_path,
                                                                                              monkeypatch, capsys):
    from train import sft
    from train.cli import run_cli

    monkeypatch.setitem(sys.modules, "wandb", None)  # importlib.util.find_spec("wandb") is None: not installed
    # Commands that do not track (evaluation, the planner) read such a recipe; the training loops refuse it.
    assert load_config(repo_root / "configs/tiny.yaml", ["--trackers", "tensorboard,wandb"]).trackers == [
        "tensorboard", "wandb"]
    with pytest.raises(SystemExit) as exit_info:  # the entry point: one line, and nothing written or loaded yet
        run_cli(sft.main, ["--config", str(repo_root / "configs/tiny.yaml"), "--output_dir", str(tmp_path / "run"),
                           "--model.name_or_path", str(tmp_path / "no-model-here"), "--trackers", "wandb"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: trackers: wandb is not installed: pip install wandb")
    assert not (tmp_path / "run").exists()
    from train import ppo

    with pytest.raises(SystemExit) as exit_info:  # PPO refuses before its reward model (which is missing) loads
        run_cli(ppo.main, ["--config", str(repo_root / "configs/tiny.yaml"), "--output_dir", str(tmp_path / "run"),
                           "--reward.model_name_or_path", str(tmp_path / "no-classifier"), "--trackers", "wandb"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: trackers: wandb is not installed: pip install wandb")
    assert not (tmp_path / "run").exists()


def test_missing_config_file_names_the_file_and_the_recipes(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    with pytest.raises(ConfigError, match=r"config file not found: configs/nope.yaml.*configs/tiny.yaml"):
        load_config("configs/nope.yaml")


def test_saved_config_loads_back_identically(repo_root, tmp_path):
    cfg = load_config(repo_root / "configs/flan_t5_base.yaml", ["--sft.max_steps", "12"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_one_grammar_and_one_config_error_for_every_command(repo_root):
    """The grammar lives in rewards.config (the reward server shares it without importing train); its ConfigError is
    train's ConfigError and a DetoxSumError, so every entry point prints it as one line."""
    import subprocess

    import rewards.errors
    import train.errors

    assert train.errors.ConfigError is rewards.errors.ConfigError
    assert issubclass(train.errors.ConfigError, train.errors.DetoxSumError)
    cfg = load_config(repo_root / "configs/tiny.yaml", ["--reward_server.port", "8501", "--plan.gpus", "4",
                                                        "--human.n", "7"])
    assert (cfg.reward_server.port, cfg.plan.gpus, cfg.human.n) == (8501, 4, 7)
    assert (ExperimentConfig().reward_server.host, ExperimentConfig().human.host) == ("127.0.0.1", "127.0.0.1")
    with pytest.raises(ConfigError, match="--gpus was replaced: use --plan.gpus"):
        load_config(None, ["--gpus", "8"], renamed={"gpus": "plan.gpus"})
    with pytest.raises(ConfigError, match="reward_server.max_queue must be a positive integer"):
        load_config(None, ["--reward_server.max_queue", "0"])  # training recipes are checked the same way
    # rewards never imports train (the import order is eval -> train -> rewards).
    probe = ("import sys, rewards.server, rewards.client, rewards.config; "
             "print(sorted(m for m in sys.modules if m == 'train' or m.startswith('train.')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


# ----------------------------------------------------------------------------------------------------
# Ranges of the numeric settings (BOUNDS). tests/train/test_config_properties.py checks them all by property; here:
# the table covers every numeric key, each range as written below, and the real command line.


def numeric_keys(obj, prefix: str = "") -> list[str]:
    """The dotted keys of every int or float setting (Optional included) of dataclass `obj`, sub-sections included."""
    import typing

    hints = typing.get_type_hints(type(obj))
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += numeric_keys(value, f"{prefix}{f.name}.")
            continue
        types = {t for t in (typing.get_args(hints[f.name]) or (hints[f.name],)) if t is not type(None)}
        if types and types <= {int, float}:
            keys.append(prefix + f.name)
    return keys


def test_every_numeric_setting_of_every_section_has_a_range():
    from train.config import BOUNDS

    cfg = ExperimentConfig()
    keys = numeric_keys(cfg)
    # The walk reaches every kind of setting: top level, each section, sub-sections.
    assert {"seed", "reward_server.port", "plan.margin", "human.port", "eval.generation.top_p"} <= set(keys)
    assert sorted(set(keys) - set(BOUNDS)) == []  # a numeric key without a range
    assert sorted(set(BOUNDS) - set(keys)) == []  # no stale entries


# Each new range spelled out once more, independently of the table: a mistyped rule fails here. (key, accepted, refused)
SPELLED_OUT = [
    ("seed", ["0", "2147483647"], ["-1", "4294967296"]),
    ("reward.batch_size", ["1"], ["0", "-4"]),
    ("reward.max_length", ["1", "null"], ["0"]),
    ("reward.timeout_s", ["0.001", "600"], ["0", "-1", "nan", "inf"]),
    ("reward.max_retries", ["0", "5"], ["-1"]),
    ("reward_server.port", ["1", "65535"], ["0", "65536"]),
    ("reward_server.max_wait_ms", ["0", "2.5"], ["-0.1", "nan", "inf"]),
    ("reward_server.max_queue", ["1"], ["0"]),
    ("reward_server.max_texts_per_request", ["1"], ["0"]),
    ("reward_server.max_chars", ["1"], ["0"]),
    ("reward_server.torch_threads", ["1", "null"], ["0"]),
    ("plan.gpus", ["1", "64"], ["0", "-1"]),
    ("plan.zero", ["0", "1", "2", "3"], ["-1", "4"]),
    ("plan.gpu_mem_gib", ["0.5", "141"], ["0", "-1", "nan", "inf"]),
    ("plan.margin", ["0", "0.99"], ["1", "-0.01", "nan"]),
    ("human.n", ["1", "500"], ["0", "-3"]),
    ("human.seed", ["0", "12345"], ["-1"]),
    ("human.port", ["1", "65535"], ["0", "65536"]),
]


@pytest.mark.parametrize("key, accepted, refused", SPELLED_OUT, ids=[case[0] for case in SPELLED_OUT])
def test_each_new_range_is_the_intended_one(key, accepted, refused):
    for value in accepted:
        cfg = load_config(None, [f"--{key}", value])
        owner = cfg
        for part in key.split("."):
            owner = getattr(owner, part)
        assert owner == (None if value == "null" else float(value)), (key, value)
    for value in refused:
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be .*, got "):
            load_config(None, [f"--{key}", value])


@pytest.mark.parametrize("argv, message", [
    (["--human.n", "0"], "human.n must be at least 1, got 0"),
    (["--human.port", "0"], "human.port must be between 1 and 65535, got 0"),
    (["--reward_server.port", "70000"], "reward_server.port must be between 1 and 65535, got 70000"),
    (["--reward.max_length", "0"], "reward.max_length must be a positive integer or null, got 0"),
    (["--reward.timeout_s", "nan"], "reward.timeout_s must be positive and finite, got nan"),
    (["--reward.max_retries", "-1"], "reward.max_retries must be 0 or more, got -1"),
    (["--plan.zero", "5"], "plan.zero must be one of 0, 1, 2, 3, got 5"),
    (["--plan.margin", "1"], "plan.margin must be in [0, 1), got 1.0"),
    (["--seed", "1" + "0" * 400], "seed must be between 0 and 2147483647, got 1" + "0" * 400),  # beyond any float
])
def test_range_errors_read_as_before(argv, message):
    """The wording the commands have always used (the reward server's and eval.human's tests pin some of it)."""
    with pytest.raises(ConfigError) as error:
        load_config(None, argv)
    assert str(error.value) == message


def _outside(rule: str, integer: bool) -> list[str]:
    """Values just outside a BOUNDS rule ("> x", ">= x", an interval or a set)."""
    if rule[0] == "{":
        members = [int(x) for x in rule[1:-1].split(",")]
        return [str(min(members) - 1), str(max(members) + 1)]
    if rule[0] == ">":
        bound = float(rule.split()[1])
        values = [bound - 1] + ([bound] if rule.startswith("> ") else [])
    else:
        low, high = (float(x) for x in rule[1:-1].split(","))
        values = [low - 1, high + 1] + ([low] if rule[0] == "(" else []) + ([high] if rule[-1] == ")" else [])
    return [str(int(v)) if integer else str(v) for v in values]


def _bound_cases():
    import typing

    from train.config import BOUNDS

    cases = []
    for key, rule in BOUNDS.items():
        owner = ExperimentConfig()
        *sections, name = key.split(".")
        for section in sections:
            owner = getattr(owner, section)
        hint = typing.get_type_hints(type(owner))[name]
        cases += [(key, value) for value in _outside(rule, int in (typing.get_args(hint) or (hint,)))]
    return cases


@pytest.mark.parametrize("key, value", _bound_cases())
def test_a_value_outside_its_range_is_one_error_naming_the_key(repo_root, key, value):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be .*, got "):
        load_config(None, [f"--{key}", value])


def test_the_real_command_line_refuses_a_bad_range_before_loading_any_model(repo_root, tmp_path):
    """One real `python -m` run (the in-process checks of every entry point are in test_config_properties.py)."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "train.ppo", "--config", "configs/tiny.yaml", "--output_dir", str(tmp_path / "run"),
         "--model.name_or_path", str(tmp_path / "no-model"), "--plan.margin", "1"],
        cwd=repo_root, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.splitlines() == ["error: plan.margin must be in [0, 1), got 1.0"], \
        proc.stderr
    assert not (tmp_path / "run").exists()
