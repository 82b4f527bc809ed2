"""Property-based checks of the numeric settings (train/config.py BOUNDS): every invalid value of every ranged key is
one ConfigError naming that key, and no valid value is refused for its range."""

from __future__ import annotations

import math
import typing

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from train.config import BOUNDS, ExperimentConfig, _within, load_config
from train.errors import ConfigError

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _is_int(key: str) -> bool:
    owner = ExperimentConfig()
    *sections, name = key.split(".")
    for section in sections:
        owner = getattr(owner, section)
    hint = typing.get_type_hints(type(owner))[name]
    return int in (typing.get_args(hint) or (hint,))


def _values(is_int: bool):
    if is_int:
        return st.integers(min_value=-10**12, max_value=10**12)
    return st.floats(allow_nan=True, allow_infinity=True)


def _text(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _valid(value, rule: str) -> bool:
    return math.isfinite(value) and _within(value, rule)


@FAST
@given(data=st.data())
def test_every_invalid_value_is_one_error_naming_its_key(data):
    key = data.draw(st.sampled_from(sorted(BOUNDS)))
    value = data.draw(_values(_is_int(key)).filter(lambda v: not _valid(v, BOUNDS[key])))
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"--{key}", _text(value)])
    assert str(error.value).startswith(f"{key} must be "), str(error.value)
    assert "\n" not in str(error.value)


@FAST
@given(data=st.data())
def test_no_valid_value_is_refused_for_its_range(data):
    key = data.draw(st.sampled_from(sorted(BOUNDS)))
    value = data.draw(_values(_is_int(key)).filter(lambda v: _valid(v, BOUNDS[key])))
    try:
        load_config(None, [f"--{key}", _text(value)])
    except ConfigError as error:  # a cross-field rule may still apply (e.g. batch_size a multiple of mini_batch_size)
        assert not (str(error).startswith(f"{key} must be ") and ", got " in str(error)), str(error)  # the range error


@pytest.mark.parametrize("key", sorted(k for k in BOUNDS if not _is_int(k)))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_for_every_float_setting(key, value):
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')} must be .*, got "):
        load_config(None, [f"--{key}", value])
