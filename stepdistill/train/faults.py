"""Fault injection for the kill-and-resume tests: STEPDISTILL_KILL_AT=<point>:<step> SIGKILLs the process there.

Points: `step` (after an update, before its checkpoint), `checkpoint` (checkpoint files written, not yet
published), `export` (stage export written, not yet published). Unset in normal runs: a no-op.
"""

from __future__ import annotations

import os
import signal


def maybe_kill(point: str, step: int) -> None:
    if os.environ.get("STEPDISTILL_KILL_AT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
