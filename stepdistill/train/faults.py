"""Fault injection for the kill-and-resume tests: STEPDISTILL_KILL_AT=<point>:<step> SIGKILLs the process there.

Points, in the order one step meets them (`step` counts updates, so the first update is step 1):
  `mid-step`          inside update `step`: the student has stepped, the critic updates and after_step have not run
  `export`            a stage or final export written to its temp folder, not yet published (DIR/<name>/)
  `step`              after update `step`, before its log line and checkpoint
  `checkpoint-write`  checkpoint `step` half written: the per-process files are there, state.pt is not
  `checkpoint`        checkpoint `step` fully written and marked complete in its temp folder, not yet published
STEPDISTILL_KILL_RANK=<r> limits the kill to process r of a multi-process run (the others carry on until torchrun
tears the job down). Unset in normal runs: a no-op.
"""

from __future__ import annotations

import os
import signal

POINTS = ("mid-step", "export", "step", "checkpoint-write", "checkpoint")


def maybe_kill(point: str, step: int) -> None:
    rank = os.environ.get("STEPDISTILL_KILL_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    if os.environ.get("STEPDISTILL_KILL_AT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
