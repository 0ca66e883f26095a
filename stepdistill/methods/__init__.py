"""Built-in methods; importing a module registers it."""

from . import consistency  # noqa: F401
