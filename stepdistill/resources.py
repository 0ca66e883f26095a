"""Where the presets (configs/) and the toy assets (assets/) are, installed or in a source checkout.

Both folders sit at the top of the repository and are installed as package data under `stepdistill.configs` and
`stepdistill.assets` (pyproject.toml), so a wheel runs `stepdistill demo` from any directory.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def _root(kind: str) -> Path:
    # The data folders are namespace packages (no __init__.py): their spec's search location is the folder itself,
    # in a wheel (site-packages/stepdistill/<kind>) and in an editable install (the repository's <kind>/) alike.
    try:
        spec = importlib.util.find_spec(f"stepdistill.{kind}")
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:  # a source tree that was never installed
        return Path(__file__).resolve().parents[1] / kind
    return Path(list(spec.submodule_search_locations)[0])


def configs_dir() -> Path:
    """The shipped presets: configs/<method>/..., configs/toy/, configs/tiny/."""
    return _root("configs")


def assets_dir() -> Path:
    """The shipped artifacts; STEPDISTILL_ASSETS points at another assets/ folder."""
    override = os.environ.get("STEPDISTILL_ASSETS")
    return Path(override) if override else _root("assets")


def preset_path(path) -> Path:
    """`path` as given if it exists, else the shipped preset of that name (`configs/toy/dmd_1step.yaml` works
    from any directory once the package is installed)."""
    given = Path(path)
    if given.exists():
        return given
    parts = given.parts[1:] if given.parts[:1] == ("configs",) else given.parts
    shipped = configs_dir().joinpath(*parts) if parts and not given.is_absolute() else given
    return shipped if shipped.exists() else given


def shipped_path(path: str) -> str:
    """A preset's `assets/...` path: as given when it exists here (a source checkout), else the shipped copy."""
    given = Path(path)
    if given.exists() or given.is_absolute() or given.parts[:1] != ("assets",):
        return path
    shipped = assets_dir().joinpath(*given.parts[1:])
    return str(shipped) if shipped.exists() else path
