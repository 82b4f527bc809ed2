"""Config loading: YAML recipes, command-line overrides, and one clear error for each kind of bad input."""

import dataclasses

import pytest

from train.config import ExperimentConfig, load_config, save_config
from train.errors import ConfigError


def test_reference_recipe_reproduces_the_reference_workflow(repo_root):
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


def test_defaults_are_the_reference_recipe(repo_root):
    """One source of truth: the dataclass defaults already are the reference workflow's settings."""
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
        ("data:\n  train_fraction: 1.5\n", "train_fraction must be between 0 and 1"),
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
    ],
)
def test_bad_overrides_give_one_clear_error(repo_root, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(repo_root / "configs/tiny.yaml", overrides)


def test_missing_config_file_names_the_file_and_the_recipes(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    with pytest.raises(ConfigError, match=r"config file not found: configs/nope.yaml.*configs/tiny.yaml"):
        load_config("configs/nope.yaml")


def test_saved_config_loads_back_identically(repo_root, tmp_path):
    cfg = load_config(repo_root / "configs/flan_t5_base.yaml", ["--sft.max_steps", "12"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
