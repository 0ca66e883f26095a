"""Config precedence, types, unknown keys, and every shipped preset parses."""

from pathlib import Path

import pytest

from stepdistill.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_precedence_defaults_yaml_set(tmp_path):
    p = _write(tmp_path, "method: {name: lcm}\nmodel: {path: m}\ndata: {prompts: p, batch_size: 3}\nloop: {max_steps: 7}\n")
    cfg = load_config(p, ["loop.max_steps=9", "seed=4"])
    assert cfg.loop.max_steps == 9  # --set beats YAML
    assert cfg.data.batch_size == 3  # YAML beats default
    assert cfg.loop.log_every == 10  # default
    assert cfg.seed == 4
    assert cfg.method.name == "lcm" and cfg.method.segments == [1]


def test_method_section_is_typed_by_the_method(tmp_path):
    p = _write(tmp_path, "method: {name: tscd, segments: [4, 2]}\nmodel: {path: m}\ndata: {prompts: p}\n")
    cfg = load_config(p, ["method.ema_decay=0.9", "method.segments=8,4"])
    assert cfg.method.segments == [8, 4] and cfg.method.ema_decay == 0.9


@pytest.mark.parametrize("override, expected", [
    (["loop.max_stpes=3"], "loop.max_steps"),
    (["modle.path=x"], "model"),
    (["method.segmets=[1]"], "method.segments"),
])
def test_unknown_key_names_the_closest(tmp_path, override, expected):
    p = _write(tmp_path, "method: lcm\nmodel: {path: m}\ndata: {prompts: p}\n")
    with pytest.raises(ConfigError, match=f"did you mean '{expected}'"):
        load_config(p, override)


@pytest.mark.parametrize("override, match", [
    (["loop.max_steps=abc"], "must be an integer"),
    (["loop.max_steps=0"], ">= 1"),
    (["model.family=sd4"], "one of"),
    (["optim.lr=-1"], "optim.lr"),
    (["method.name=dmdd"], "unknown method"),
    (["loop"], "KEY=VALUE"),
    (["model.family=sd15", "model.max_sequence_length=8"], "encodes no T5"),
    (["model.family=sd3", "model.max_sequence_length=0"], ">= 1"),
])
def test_bad_values_are_clear_errors(tmp_path, override, match):
    p = _write(tmp_path, "method: lcm\nmodel: {path: m}\ndata: {prompts: p}\n")
    with pytest.raises(ConfigError, match=match):
        load_config(p, override)


def test_missing_model_path_says_what_to_do(tmp_path):
    p = _write(tmp_path, "method: lcm\ndata: {prompts: p}\n")
    with pytest.raises(ConfigError, match="model.path"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no config file"):
        load_config(tmp_path / "nope.yaml")


def test_every_shipped_preset_parses():
    presets = sorted((ROOT / "configs").rglob("*.yaml"))
    presets = [p for p in presets if "accelerate" not in p.parts]
    assert presets, "configs/ has no presets"
    for p in presets:
        cfg = load_config(p, ["model.path=x", "data.prompts=y"])
        assert cfg.method.name


def test_an_unquoted_yaml_no_is_the_word_where_a_setting_means_it(tmp_path):
    """YAML 1.1 reads `no` as false: `--set loop.mixed_precision=no` (a documented value) failed as 'not a string'."""
    p = _write(tmp_path, "method: {name: lcm}\nmodel: {path: m}\ndata: {prompts: p}\nloop: {mixed_precision: no}\n")
    assert load_config(p).loop.mixed_precision == "no"
    assert load_config(p, ["loop.mixed_precision=no"]).loop.mixed_precision == "no"
    with pytest.raises(ConfigError, match="quote the word"):
        load_config(p, ["model.attention=off"])
