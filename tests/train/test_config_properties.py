"""Property-based checks of the numeric settings (BOUNDS in train/config.py, the reward sections' in rewards/config.py):
every invalid value of every ranged key is one ConfigError naming that key, no valid value is refused for its range,
and every entry point stops on an invalid value with status 2 and that one line, before any model is built.

The rules are read here independently of rewards.config (`_parse`), so a wrong checker fails these properties."""

from __future__ import annotations

import contextlib
import io
import math
import typing

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from rewards.config import CLIENT_REWARD_KEYS, REWARD_BOUNDS, REWARD_SERVER_BOUNDS, load_server_config
from train.config import BOUNDS, ExperimentConfig, load_config
from train.errors import ConfigError

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SERVER_BOUNDS = {**{f"reward.{k}": v for k, v in REWARD_BOUNDS.items()},
                 **{f"reward_server.{k}": v for k, v in REWARD_SERVER_BOUNDS.items()}}


def _owner_and_name(key: str):
    owner = ExperimentConfig()
    *sections, name = key.split(".")
    for section in sections:
        owner = getattr(owner, section)
    return owner, name


def _is_int(key: str) -> bool:
    owner, name = _owner_and_name(key)
    hint = typing.get_type_hints(type(owner))[name]
    return int in (typing.get_args(hint) or (hint,))


def _parse(rule: str):
    """A rule as (low, low included, high, high included), or the set of its allowed integers."""
    if rule.startswith("{"):
        return {int(x) for x in rule[1:-1].split(",")}
    if rule.startswith(">="):
        return float(rule[2:]), True, math.inf, False
    if rule.startswith(">"):
        return float(rule[1:]), False, math.inf, False
    low, high = rule[1:-1].split(",")
    return float(low), rule[0] == "[", float(high), rule[-1] == "]"


def _inside(value, rule: str) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    parsed = _parse(rule)
    if isinstance(parsed, set):
        return value in parsed
    low, low_in, high, high_in = parsed
    return (value >= low if low_in else value > low) and (value <= high if high_in else value < high)


def _edges(rule: str) -> list[float]:
    """Values at and just beside the ends of a rule: where an off-by-one checker differs."""
    parsed = _parse(rule)
    ends = sorted(parsed) if isinstance(parsed, set) else [x for x in (parsed[0], parsed[2]) if math.isfinite(x)]
    return [x + d for x in ends for d in (-1, 0, 1)] + [y for x in ends for y in (math.nextafter(x, -math.inf),
                                                                                  math.nextafter(x, math.inf))]


def _values(key: str, rule: str):
    """Candidate values of `key`: anything of its type, integers too large for a float, nan and infinities, and the
    rule's edges."""
    if _is_int(key):
        edges = sorted({int(x) for x in _edges(rule) if x == int(x)})
        return st.one_of(st.integers(), st.integers(min_value=-10**400, max_value=10**400), st.sampled_from(edges))
    return st.one_of(st.floats(), st.sampled_from(_edges(rule) + [math.nan, math.inf, -math.inf]))


def _inside_values(key: str, rule: str):
    """Values inside the rule, drawn directly (a filter would rarely hit a narrow range such as a port)."""
    parsed = _parse(rule)
    if isinstance(parsed, set):
        return st.sampled_from(sorted(parsed))
    low, low_in, high, high_in = parsed
    if _is_int(key):
        lowest = int(low) if low_in else int(low) + 1
        highest = None if math.isinf(high) else (int(high) if high_in else int(high) - 1)
        return st.one_of(st.integers(min_value=lowest, max_value=highest),
                         st.sampled_from([lowest] + ([highest] if highest is not None else [10**400])))
    return st.floats(min_value=low, max_value=None if math.isinf(high) else high, exclude_min=not low_in,
                     exclude_max=not high_in and not math.isinf(high), allow_nan=False, allow_infinity=False)


def _text(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _set(cfg, key: str):
    *sections, name = key.split(".")
    for section in sections:
        cfg = getattr(cfg, section)
    return getattr(cfg, name)


def _range_error(message: str, key: str) -> bool:
    return message.startswith(f"{key} must be ") and ", got " in message and "\n" not in message


@FAST
@given(data=st.data())
def test_every_invalid_value_is_one_error_naming_its_key(data):
    key = data.draw(st.sampled_from(sorted(BOUNDS)), label="key")
    value = data.draw(_values(key, BOUNDS[key]).filter(lambda v: not _inside(v, BOUNDS[key])), label="value")
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"--{key}", _text(value)])
    assert _range_error(str(error.value), key), str(error.value)


@FAST
@given(data=st.data())
def test_no_valid_value_is_refused_for_its_range(data):
    key = data.draw(st.sampled_from(sorted(BOUNDS)), label="key")
    value = data.draw(_inside_values(key, BOUNDS[key]), label="value")
    try:
        cfg = load_config(None, [f"--{key}", _text(value)])
    except ConfigError as error:  # a cross-field rule may still apply (e.g. batch_size a multiple of mini_batch_size)
        assert not _range_error(str(error), key), str(error)
    else:
        assert _set(cfg, key) == value


@pytest.mark.parametrize("key", sorted(k for k in BOUNDS if not _is_int(k)))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_for_every_float_setting(key, value):
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')} must be .*, got "):
        load_config(None, [f"--{key}", value])


def test_the_reward_sections_ranges_are_written_once():
    # train's table takes the reward server's ranges as they are, so the two cannot disagree.
    assert {k: BOUNDS[k] for k in SERVER_BOUNDS} == SERVER_BOUNDS


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_reward_server_checks_the_same_ranges(tmp_path, data):
    """load_server_config (python -m rewards.server, which does not import train) on a recipe with one value set."""
    key = data.draw(st.sampled_from(sorted(SERVER_BOUNDS)), label="key")
    valid = data.draw(st.booleans(), label="valid")
    strategy = _values(key, SERVER_BOUNDS[key]).filter(lambda v: not _inside(v, SERVER_BOUNDS[key]))
    value = data.draw(_inside_values(key, SERVER_BOUNDS[key]) if valid else strategy, label="value")
    section, name = key.split(".")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({section: {name: value}}))  # a recipe: client keys too (not on its command line)
    if valid:
        assert _set(load_server_config(recipe), key) == value
    else:
        with pytest.raises(ConfigError) as error:
            load_server_config(recipe)
        assert _range_error(str(error.value), key), str(error.value)


# ----------------------------------------------------------------------------------------------------
# Every entry point: exit status 2 and one line naming the key, before any model is built


class ModelBuilt(BaseException):
    """Raised by any torch module's construction during these tests. A BaseException, so no `except Exception` of
    the code under test turns it into some other error: a model built before the check fails the test."""


def _run_cli(module: str):
    def run(argv: list[str]) -> int:
        import importlib

        from train.cli import run_cli

        try:
            run_cli(importlib.import_module(module).main, argv)
        except SystemExit as stop:
            return stop.code
        return 0
    return run


def _returns_status(module: str):
    def run(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(module).main(argv)
    return run


# entry point -> (runner, arguments before the override, the prefix of its error line)
ENTRY_POINTS = {
    "train.sft": (_run_cli("train.sft"), [], "error: "),
    "train.ppo": (_run_cli("train.ppo"), [], "error: "),
    "eval.evaluate": (_run_cli("eval.evaluate"), [], "error: "),
    "train.plan": (_run_cli("train.plan"), [], "error: "),
    "eval.human export": (_run_cli("eval.human.__main__"), ["export"], "error: "),
    "eval.human serve": (_run_cli("eval.human.__main__"), ["serve"], "error: "),
    "eval.human report": (_run_cli("eval.human.__main__"), ["report"], "error: "),
    "train.param_report": (_run_cli("train.param_report"), [], "error: "),
    "train.merge_adapter": (_run_cli("train.merge_adapter"), ["--out", "{tmp}/merged"], "error: "),
    "eval.pipeline": (_returns_status("eval.pipeline"), [], "error: "),
    "rewards.server": (_returns_status("rewards.server"), [], "rewards.server: error: "),
}


def _only_in_a_recipe(entry: str, key: str) -> bool:
    """Keys an entry point's command line refuses by design, set in its recipe instead: the reward server's client
    keys, and a command's former flags (eval.human export's --seed now means --human.seed)."""
    from eval.human.__main__ import FORMER_FLAGS

    if entry == "rewards.server":
        return key.split(".")[1] in CLIENT_REWARD_KEYS
    return entry.startswith("eval.human ") and key in FORMER_FLAGS[entry.split()[1]]


@pytest.fixture
def no_model_built(monkeypatch):
    import importlib

    for module in ("train.sft", "train.ppo", "eval.evaluate", "train.plan", "eval.human.__main__", "train.param_report",
                   "train.merge_adapter", "eval.pipeline", "rewards.server"):
        importlib.import_module(module)  # imported before the guard goes up

    def refuse(self, *args, **kwargs):
        raise ModelBuilt(f"{type(self).__name__} built before the config was refused")

    def no_stage(*args, **kwargs):
        raise ModelBuilt(f"eval.pipeline started a stage: {args}")

    monkeypatch.setattr(torch.nn.Module, "__init__", refuse)
    monkeypatch.setattr("eval.pipeline.subprocess.call", no_stage)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_entry_point_refuses_an_invalid_value_in_one_line_before_any_model(repo_root, tmp_path, no_model_built,
                                                                               entry, data):
    run, head, prefix = ENTRY_POINTS[entry]
    server = entry == "rewards.server"
    bounds = SERVER_BOUNDS if server else BOUNDS  # the server reads the reward sections only
    key = data.draw(st.sampled_from(sorted(bounds)), label="key")
    value = data.draw(_values(key, bounds[key]).filter(lambda v: not _inside(v, bounds[key])), label="value")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in head] + ["--config", str(repo_root / "configs/tiny.yaml")]
    if _only_in_a_recipe(entry, key):
        recipe = yaml.safe_load((repo_root / "configs/tiny.yaml").read_text())
        *sections, name = key.split(".")
        owner = recipe
        for section in sections:
            owner = owner.setdefault(section, {})
        owner[name] = value
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        argv[-1] = str(tmp_path / "recipe.yaml")
    else:
        argv += [f"--{key}", _text(value)]
    if not server:
        argv += ["--output_dir", str(tmp_path / "run")]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = run(argv)
    lines = err.getvalue().splitlines()
    assert status == 2 and len(lines) == 1, (status, err.getvalue())
    assert lines[0].startswith(prefix) and _range_error(lines[0][len(prefix):], key), lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "merged").exists()
