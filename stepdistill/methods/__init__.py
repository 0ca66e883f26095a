"""Built-in methods; importing a module registers it."""

from . import (  # noqa: F401
    consistency,
    disback,
    dmd,
    reward,
)
