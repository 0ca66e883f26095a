"""The error types that mean 'bad input': the CLI prints them as one line instead of a traceback."""

from __future__ import annotations

from .config import ConfigError
from .data.prompts import DataError


class ModelError(ValueError):
    """A model folder, LoRA or recipe that cannot be used; the message says what to do."""


USER_ERRORS = (ConfigError, DataError, ModelError, FileNotFoundError)
