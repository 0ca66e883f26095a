"""Built-in methods; importing a module registers it."""

from . import consistency, dmd, reward  # noqa: F401
from . import disback  # noqa: F401
