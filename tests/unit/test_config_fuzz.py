"""The config loader, fed random dicts, random --set strings and random YAML files, raises ConfigError or nothing.

A traceback from the loader is a bug: every bad config must come back as one ConfigError line saying what to do.
"""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepdistill.config import Config, ConfigError, _all_keys, build_config, dump_config, load_config
from stepdistill.registry import get_method, method_names

METHODS = method_names()
# Every real key (so values reach the type checks and validators), plus near misses and noise.
KEYS = sorted(set(_all_keys(Config)) | {f"method.{k}" for m in METHODS for k in _all_keys(get_method(m).config_cls)})
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["", "0", "1e-3", "auto", "sd15", "full", "nan", "[1, 2]", "{a: 1}", "8,4"]),
    st.sampled_from(METHODS),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                            max_size=3), max_leaves=8)
keys = st.sampled_from(KEYS) | st.text(max_size=10)


def _nested(pairs) -> dict:
    """{'a.b': 1} -> {'a': {'b': 1}}; a later key wins over an earlier one on the same path."""
    tree: dict = {}
    for key, value in pairs:
        parts = key.split(".")
        node = tree
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return tree


configs = st.builds(_nested, st.lists(st.tuples(keys, values), max_size=8)).map(
    lambda d: {"method": {"name": "lcm"}, **d} if "method" not in d else d) | values


def _only_config_errors(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ConfigError as e:
        assert str(e).strip(), "a ConfigError must say what is wrong"
        return None


def _round_trips(cfg: Config) -> None:
    """A config that loads dumps to YAML that loads back to the same config."""
    again = build_config(yaml.safe_load(dump_config(cfg)))
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


@FUZZ
@given(data=configs, validate=st.booleans())
def test_build_config_from_random_dicts(data, validate):
    cfg = _only_config_errors(build_config, data, validate=validate)
    if cfg is not None and validate:
        _round_trips(cfg)


sets = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", keys, st.text(max_size=12)),
    st.builds(lambda k, v: f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}", keys, values),
    st.text(max_size=20),
)


@FUZZ
@given(overrides=st.lists(sets, max_size=6))
def test_load_config_from_random_set_strings(overrides, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "fuzz_base.yaml"
    path.write_text("method: lcm\nmodel: {path: m}\ndata: {prompts: p}\n")
    cfg = _only_config_errors(load_config, path, overrides)
    if cfg is not None:
        _round_trips(cfg)


yaml_texts = st.one_of(
    st.text(max_size=60),
    st.builds(lambda d: yaml.safe_dump(d, default_flow_style=False), configs),
    st.builds(lambda d, cut: yaml.safe_dump(d)[:cut], configs, st.integers(0, 80)),  # a file cut short
    st.sampled_from(["[", "a: [1, 2", "method: {name: lcm", "\t- x", "!!python/object:os.system {}", "? [a]: 1",
                     "a: &x [*x]", "%YAML 9.9\n---\na: 1", "---\na: 1\n---\nb: 2", "[" * 2000]),
)


@FUZZ
@given(text=yaml_texts, overrides=st.lists(sets, max_size=2))
def test_load_config_from_random_yaml_text(text, overrides, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "fuzz_text.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))  # lone surrogates make it non-UTF-8: also an error
    _only_config_errors(load_config, path, overrides)


@FUZZ
@given(raw=st.binary(max_size=60))
def test_load_config_from_random_bytes(raw, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "fuzz_bytes.yaml"
    path.write_bytes(raw)
    _only_config_errors(load_config, path)


@pytest.mark.parametrize("override, match", [
    ("optim.lr=nan", "finite"),
    ("optim.grad_clip=.inf", "finite"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("seed=-1", "seed"),
    ("seed=99999999999999999999", "seed"),
    ("model.resolution=100", "multiple of 8"),
    ("data.max_prompt_words=-2", "data.max_prompt_words"),
    ("lora.targets=to_q,to_k", "lora.targets"),
    ("data.images=toy:many", "toy:N"),
    ("loop.max_steps=[", "YAML"),
    ("method.segments=[1, [", "YAML"),
])
def test_values_found_by_fuzzing_are_config_errors(override, match, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: tscd\nmodel: {path: m}\ndata: {prompts: p}\n")
    with pytest.raises(ConfigError, match=match):
        load_config(path, [override])


def test_non_utf8_config_file_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"method: lcm\nmodel: {path: \xff\xfe}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)
