"""SIGINT/SIGTERM (Ctrl-C, a cluster preempting the job): finish the step, save a checkpoint, say how to resume.

The first signal only sets a flag; the loop reads it at its once-per-step agreement point (every process must
decide to stop at the same step, or the last collectives would hang), saves a complete checkpoint and exits
with 128 + the signal number. A second signal exits at once: checkpoints are written to a temporary folder and
renamed into place when complete, so an exit mid-save leaves every earlier checkpoint intact.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(RuntimeError):
    """Stopped by a signal after saving; ``exit_code`` is 128 + the signal number, as shells report it."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number


class StopRequest:
    """Installed for the duration of a training run (main thread only; elsewhere signals keep their handlers)."""

    def __init__(self) -> None:
        self.signal_number: Optional[int] = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signal_number: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signal_number).name
        if self.requested:
            sys.stderr.write(f"\n{name} again: exiting now without saving (earlier checkpoints are intact)\n")
            sys.stderr.flush()
            os._exit(128 + signal_number)
        self.signal_number = signal_number
        sys.stderr.write(f"\n{name}: finishing this step and saving a checkpoint (send it again to exit now)\n")
        sys.stderr.flush()
