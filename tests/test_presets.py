"""Preset names are names, not paths: a name cannot reach a .toml elsewhere on disk."""

import os
from importlib import resources

import pytest

import loopmoe.presets
from loopmoe.presets import get_preset, is_paper_scale, list_presets, load_model_config


@pytest.fixture
def outside_toml(tmp_path):
    """A valid-looking preset outside the package, and the relative name that reached it."""
    (tmp_path / "evil.toml").write_text('description = "not shipped"\nhidden_size = 64\n')
    presets_dir = str(resources.files(loopmoe.presets))
    return os.path.relpath(tmp_path / "evil", presets_dir)


def test_preset_name_that_is_a_path_is_refused(outside_toml):
    assert outside_toml.startswith("..")
    for call in (get_preset, is_paper_scale, load_model_config):
        with pytest.raises(ValueError, match=r"invalid preset name .*not a path") as info:
            call(outside_toml)
        assert all(name in str(info.value) for name in list_presets())


def test_preset_reference_in_a_config_file_is_refused(tmp_path, outside_toml):
    config = tmp_path / "model.toml"
    config.write_text(f'[model]\npreset = "{outside_toml}"\n')
    with pytest.raises(ValueError, match="invalid preset name"):
        load_model_config(config)


@pytest.mark.parametrize("name", ["debug/..", "a b", "", "debug.toml", "/etc/passwd"])
def test_odd_names_are_refused(name):
    with pytest.raises(ValueError, match="invalid preset name"):
        get_preset(name)


def test_shipped_presets_still_load():
    for name in list_presets():
        get_preset(name)
