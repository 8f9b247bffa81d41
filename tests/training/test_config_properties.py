"""Property: any table of settings, however wrong, either builds a valid RunConfig or raises ValueError.

Values are drawn from each key's type in the RunConfig schema, plus junk: wrong types, NaN and
infinities, negatives, huge numbers, unknown keys and sections.
"""

import contextlib
import dataclasses
import time
from typing import get_type_hints

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopmoe.config import CONFIG_FIELDS
from loopmoe.training.config import RunConfig, config_from_dict

_SECTIONS = get_type_hints(RunConfig)
_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e308, -1e-9]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.floats(allow_nan=True), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)
_NAMES = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in _SECTIONS.items()}
_MODEL_KEYS = st.sampled_from([*CONFIG_FIELDS, "num_loops", "preset", "config"])


def _value_for(section: str, key: str):
    """A plausible value of the key's own type half the time, junk otherwise."""
    default = getattr(_SECTIONS[section](), key, None)
    if isinstance(default, bool):
        typed = st.booleans()
    elif isinstance(default, int):
        typed = st.integers(min_value=-3, max_value=3000)
    elif isinstance(default, float):
        typed = st.floats(min_value=-2.0, max_value=2.0) | st.sampled_from([1e-8, 0.5, 0.95])
    elif isinstance(default, tuple):
        typed = st.lists(st.floats(min_value=-0.5, max_value=1.5), min_size=2, max_size=2)
    elif isinstance(default, str):
        typed = st.sampled_from([default, "wsd", "ddp", "fsdp2", "bf16", "full", "debug", "nope"])
    else:
        typed = st.none() | st.integers(min_value=-2, max_value=512)
    return st.one_of(typed, _JUNK)


@st.composite
def raw_configs(draw):
    raw: dict = {}
    for section in draw(st.lists(st.sampled_from(list(_SECTIONS)), unique=True)):
        keys = draw(st.lists(st.sampled_from(_NAMES[section]), unique=True, max_size=6))
        table = {k: draw(_value_for(section, k)) for k in keys}
        if section == "model":
            for k in draw(st.lists(_MODEL_KEYS, unique=True, max_size=4)):
                table[k] = draw(st.one_of(st.integers(-2, 256), _JUNK))
        if draw(st.integers(0, 9)) == 0:
            table[draw(st.text(min_size=1, max_size=8))] = draw(_JUNK)
        raw[section] = table
    if draw(st.integers(0, 19)) == 0:
        raw[draw(st.text(min_size=1, max_size=8))] = draw(st.one_of(_JUNK, st.just({})))
    return raw


@settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(raw_configs())
def test_any_table_builds_a_valid_config_or_raises_value_error(raw):
    start = time.perf_counter()
    with contextlib.suppress(ValueError):
        config_from_dict(raw).validate()
    assert time.perf_counter() - start < 1.0
