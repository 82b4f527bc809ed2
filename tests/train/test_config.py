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
        (["--ppo.mini_batch_size", "0"], "ppo.mini_batch_size must be positive"),
        (["--reward.normalize", "true"], "--reward.normalize was replaced: use --ppo.score_normalization standardize"),
        (["--trackers", "tensorboard,mlflow"], "unknown tracker 'mlflow'; use tensorboard, wandb, both"),
        (["--trackers", "none,wandb"], "'none' cannot be combined with other trackers"),
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
# Ranges of the numeric settings (BOUNDS)

RANGED_SECTIONS = ("data", "model", "lora", "rollout", "sft", "ppo", "eval", "eval.generation")


def _numeric_keys(cfg, prefix: str) -> list[str]:
    import dataclasses
    import typing

    hints = typing.get_type_hints(type(cfg))
    keys = []
    for f in dataclasses.fields(cfg):
        types = {t for t in (typing.get_args(hints[f.name]) or (hints[f.name],)) if t is not type(None)}
        if types <= {int, float} and types:
            keys.append(prefix + f.name)
    return keys


def test_every_numeric_setting_of_the_training_and_evaluation_sections_has_a_range():
    from train.config import BOUNDS

    cfg = ExperimentConfig()
    keys = ["seed"]
    for section in RANGED_SECTIONS:
        owner = cfg
        for part in section.split("."):
            owner = getattr(owner, part)
        keys += _numeric_keys(owner, section + ".")
    assert sorted(set(keys) - set(BOUNDS)) == []
    assert sorted(set(BOUNDS) - set(keys)) == []  # no stale entries


def _outside(rule: str) -> list[str]:
    """Values just outside a BOUNDS rule."""
    if rule == "> 0":
        return ["0", "-1"]
    if rule == ">= 0":
        return ["-1"]
    low, high = rule[1:-1].split(",")
    values = [str(float(low) - 1), str(float(high) + 1)]
    values += [low.strip()] if rule[0] == "(" else []
    values += [high.strip()] if rule[-1] == ")" else []
    return values


def _bound_cases():
    from train.config import BOUNDS

    return [(key, value) for key, rule in BOUNDS.items() for value in _outside(rule)]


@pytest.mark.parametrize("key, value", _bound_cases())
def test_a_value_outside_its_range_is_one_error_naming_the_key(repo_root, key, value):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be .*, got "):
        load_config(None, [f"--{key}", value])


@pytest.mark.parametrize("module", ["train.sft", "train.ppo", "eval.evaluate"])
def test_entry_points_refuse_a_bad_range_before_loading_any_model(repo_root, tmp_path, module):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", module, "--config", "configs/tiny.yaml", "--output_dir", str(tmp_path / "run"),
         "--model.name_or_path", str(tmp_path / "no-model"), "--rollout.top_p", "0", "--eval.systems", "base"],
        cwd=repo_root, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: rollout.top_p must be in (0, 1], got 0.0"]
    assert not (tmp_path / "run").exists()
