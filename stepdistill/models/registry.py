"""Model-family registry: everything that needs the set of families (loading, CLI choices, config validation,
recipes, benchmarks, pipelines) asks here, and nothing else lists family names.

Families are discovered, not listed: on first use every module in stepdistill/models/families/ is imported, and
each registers its FamilyModel subclass with `register_family`. Adding a family is one new file there.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from ..core import recipe as _recipe
from ..errors import ModelError

_FAMILIES: dict[str, type] = {}
_discovered = False


class UnknownFamilyError(ModelError):
    """A family name no registered family has (a ValueError, as every bad input is)."""


def register_family(cls: type) -> type:
    """Make `cls` (a FamilyModel subclass) the family named `cls.name`; usable as a class decorator."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"{cls.__name__}.name must be a family name such as 'sd15' (not {name!r}, not 'auto')")
    if name in _FAMILIES and _FAMILIES[name] is not cls:
        raise ValueError(f"family {name!r} is already registered (by {_FAMILIES[name].__qualname__})")
    pipeline = getattr(cls, "pipeline_class_name", None)
    taken = [other for other, c in _FAMILIES.items() if other != name and c.pipeline_class_name == pipeline]
    if taken:
        # A folder's family is detected by its pipeline class: two families on one class would be ambiguous.
        raise ValueError(f"family {name!r} uses the pipeline {pipeline}, which family {taken[0]!r} already uses")
    _FAMILIES[name] = cls
    return cls


def unregister_family(name: str) -> None:
    """Forget the family `name` (tests that register a family of their own clean up with this)."""
    _FAMILIES.pop(name, None)


def _discover() -> None:
    """Import every module of models/families/ once; each registers itself."""
    global _discovered
    if _discovered:
        return
    from . import families

    for info in pkgutil.iter_modules(families.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{families.__name__}.{info.name}")
    _discovered = True


def family_names() -> list[str]:
    """The registered family names, sorted."""
    _discover()
    return sorted(_FAMILIES)


def unknown_family_message(name) -> str:
    """One line naming the close match, if any, and every registered family."""
    names = family_names()
    lower = {n.lower(): n for n in names}  # "SD15" is a typo of "sd15" too
    close = difflib.get_close_matches(str(name).lower(), list(lower), n=1)
    hint = f" (did you mean {lower[close[0]]!r}?)" if close else ""
    return f"family {name!r} is not supported{hint}: use one of {', '.join(names)}"


def get_family(name: str) -> type:
    """The FamilyModel subclass registered as `name`; UnknownFamilyError names the close match."""
    _discover()
    if name not in _FAMILIES:
        raise UnknownFamilyError(unknown_family_message(name))
    return _FAMILIES[name]


def family_for_pipeline(class_name: str | None) -> type | None:
    """The family whose diffusers pipeline is `class_name` (a model_index.json `_class_name`), or None."""
    _discover()
    return next((cls for cls in _FAMILIES.values() if cls.pipeline_class_name == class_name), None)


def supported_pipelines() -> str:
    """"StableDiffusionPipeline (sd15), ..." for error messages."""
    return ", ".join(f"{get_family(n).pipeline_class_name} ({n})" for n in family_names())


# core knows no families: a recipe (core.recipe.Recipe) checks its family through this registry once models is
# imported, which every reader and writer of recipes (train, export, pipelines) does.
_recipe.set_family_check(get_family)
