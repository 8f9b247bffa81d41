"""One reading of typed text for flags, overrides and TOML: `none` is a choice where it is one."""

import argparse
import dataclasses
from typing import get_type_hints

import pytest

from loopmoe.config import CHOICE_FIELDS, IterConditioning, choice_values
from loopmoe.options import add_options, choices_of, option, options_from, parse_text
from loopmoe.training.config import RunConfig, apply_overrides, config_from_dict, load_run_config


def _section_choice_fields():
    """(section, key, choices) of every string-choice field of the run config's sections."""
    for section, cls in get_type_hints(RunConfig).items():
        for f in dataclasses.fields(cls):
            if choices := choices_of(get_type_hints(cls)[f.name]):
                yield section, f.name, choices


@pytest.mark.parametrize("key", sorted(CHOICE_FIELDS))
def test_every_model_choice_override_is_kept_as_typed(key):
    for value in choice_values(CHOICE_FIELDS[key]):
        raw = apply_overrides({}, [f"model.{key}={value}"])
        assert raw["model"][key] == value, f"model.{key}={value} was read as {raw['model'][key]!r}"


@pytest.mark.parametrize(("section", "key", "choices"), list(_section_choice_fields()))
def test_every_section_choice_override_round_trips(section, key, choices):
    for value in choices:
        cfg = config_from_dict(apply_overrides({}, [f"{section}.{key}={value}"]))
        assert getattr(getattr(cfg, section), key) == value


def test_the_section_choice_fields_include_none_choices():
    # The bug this guards against: `train.activation_checkpointing=none` was read as Python None.
    assert ("train", "activation_checkpointing") in {(s, k) for s, k, _ in _section_choice_fields()}


def test_none_stays_python_none_where_the_field_is_optional():
    raw = apply_overrides({}, ["model.dcca_dim=none", "train.grad_accum=null", "model.num_loops=none"])
    assert raw["model"]["dcca_dim"] is None and raw["train"]["grad_accum"] is None
    assert raw["model"]["num_loops"] is None


def test_iter_conditioning_none_trains_an_unconditioned_loop():
    from loopmoe.training.builders import build_model_config

    cfg = load_run_config(None, ["model.preset=debug", "model.num_loops=2", "model.iter_conditioning=none"])
    config = build_model_config(cfg, vocab_size=256)
    assert config.num_loops == 2 and config.iter_conditioning == "none"
    assert not IterConditioning(config.iter_conditioning).modulates


def test_parse_text_reads_by_annotation():
    assert parse_text("none", IterConditioning | None) == "none"
    assert parse_text("None", int | None) is None
    assert parse_text("3e-4", float) == 3e-4
    assert parse_text("007", str) == "007"  # text fields keep the text as typed
    assert parse_text("[0.9, 0.95]", tuple[float, float]) == [0.9, 0.95]


@dataclasses.dataclass
class _Flags:
    conditioning: IterConditioning | None = option(None, help="a StrEnum choice that includes none")
    width: int | None = option(None, help="an optional number")


def test_command_line_flags_read_none_the_same_way():
    parser = argparse.ArgumentParser()
    add_options(parser, _Flags)
    opts = options_from(_Flags, parser.parse_args(["--conditioning", "none", "--width", "none"]))
    assert opts.conditioning == "none" and opts.width is None
    assert options_from(_Flags, parser.parse_args([])).conditioning is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--conditioning", "adaln"])
