"""Method registry: train/ and the CLI find methods by name here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass

_METHODS: dict[str, MethodSpec] = {}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    distiller_cls: type


def register_method(name: str, config_cls: type, distiller_cls: type) -> None:
    """Make `method.name: <name>` usable in configs; config_cls holds the method's typed options."""
    if name in _METHODS and _METHODS[name].distiller_cls is not distiller_cls:
        raise ValueError(f"method {name!r} is already registered")
    _METHODS[name] = MethodSpec(name, config_cls, distiller_cls)


def get_method(name: str) -> MethodSpec:
    _import_builtin_methods()
    if name not in _METHODS:
        import difflib

        close = difflib.get_close_matches(name, list(_METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown method {name!r}{hint}; registered: {sorted(_METHODS)}")
    return _METHODS[name]


def method_names() -> list[str]:
    _import_builtin_methods()
    return sorted(_METHODS)


def _import_builtin_methods():
    """Import every module of stepdistill/methods/ once (no list to keep): each method module registers itself."""
    import importlib
    import pkgutil

    package = importlib.import_module(f"{__package__}.methods")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
