"""The package's front door: optional commands stay visible with their reason (issue 32), and `import stepdistill` gives
__version__ and the few public names."""

from __future__ import annotations

import argparse
import importlib

import pytest

from stepdistill import cli


def _parser_without(monkeypatch, missing: str):
    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name == missing:
            raise ModuleNotFoundError(f"No module named 'fakepkg' (needed by {missing})")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    return cli.build_parser()


def _subcommands(parser, *path) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def test_missing_bench_module_is_listed_with_its_reason(monkeypatch, capsys):
    parser = _parser_without(monkeypatch, "stepdistill.bench.gpu")
    bench = _subcommands(parser, "bench")
    help_text = bench.format_help()
    assert "gpu" in help_text and "unavailable" in help_text and "fakepkg" in help_text
    with pytest.raises(SystemExit, match="stepdistill bench gpu is unavailable.*fakepkg"):
        parser.parse_args(["bench", "gpu", "--out", "x"])


def test_missing_eval_module_keeps_every_eval_command(monkeypatch):
    parser = _parser_without(monkeypatch, "stepdistill.eval.cli")
    ev = _subcommands(parser, "eval")
    for name in ("generate", "fid", "clip", "preference", "report"):
        assert "unavailable" in ev.format_help() and name in ev.format_help()


def test_available_commands_are_the_real_ones():
    parser = cli.build_parser()
    assert "unavailable" not in _subcommands(parser, "bench").format_help()


def test_package_has_a_version_and_its_public_names():
    import stepdistill

    assert stepdistill.__version__ and stepdistill.__version__ != "0+unknown"
    from stepdistill import Recipe, export_run, generate_image, load_config, pipelines, register_method

    assert Recipe.__name__ == "Recipe" and callable(load_config) and callable(export_run)
    assert callable(generate_image) and callable(register_method) and callable(pipelines.load)
    with pytest.raises(AttributeError):
        stepdistill.no_such_name  # noqa: B018
