"""Error types the CLI prints as one line instead of a traceback.

USER_ERRORS mean "bad input" (exit code 2): fix the config, data, model or LoRA and run again.
RUN_ERRORS mean "the run stopped" (exit code 1): the message names the last good checkpoint, and rerunning the
same command resumes from it once the cause is fixed.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Any problem with a configuration; the message says which key and what to do."""


class DataError(ValueError):
    """A data set that cannot be used; the message says what to do."""


class ModelError(ValueError):
    """A model folder, LoRA or recipe that cannot be used; the message says what to do."""


class ModelFileError(ModelError, OSError):
    """A model that cannot be found or read (still an OSError, as file problems are)."""


class HubError(RuntimeError):
    """The Hugging Face Hub cannot be reached or refused (offline, no token, no rights); the message says what to do."""


class TrainingError(RuntimeError):
    """Training cannot go on; the message names the last good checkpoint."""


USER_ERRORS = (ConfigError, DataError, ModelError, FileNotFoundError, HubError)
RUN_ERRORS = (TrainingError,)
