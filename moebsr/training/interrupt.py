"""SIGINT/SIGTERM (Ctrl-C, a cluster preempting the job): finish the step, save a checkpoint, say how to resume.

The first signal only sets a flag; the loop reads it at its once-per-step agreement point (every process must
decide to stop at the same step, or the last collectives would hang), saves a complete checkpoint and exits
with 128 + the signal number.

One preemption often reaches the training process twice: a scheduler signals the whole process group (SLURM,
a terminal's Ctrl-C), and the launcher forwards what it got to its children as well (``accelerate launch`` from
1.16 sends SIGTERM to the process tree, torchrun's agent forwards the signal it received). So any stop signal
within :data:`REPEAT_WINDOW_S` of the first is the same request. A signal after that window exits at once:
checkpoints are written to a temporary folder and renamed into place when complete, so an exit mid-save leaves
every earlier checkpoint intact.

Launchers and schedulers give a stopping job a grace period before SIGKILL, and the step in flight plus the save
must fit in it: ``accelerate launch`` 1.16+ (one process) 5 s, torchrun's agent (``accelerate launch`` with
several processes) 30 s, Kubernetes ``terminationGracePeriodSeconds`` 30 s, SLURM ``KillWait`` 30 s, ``docker
stop`` 10 s. The stop line reports how long the save took after the signal, to compare with those.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_WINDOW_S = 2.0  # a launcher forwards within milliseconds; a person who means "now" presses again later


class TrainingInterrupted(RuntimeError):
    """Stopped by a signal after saving; ``exit_code`` is 128 + the signal number, as shells report it."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number


class StopRequest:
    """Installed for the duration of a training run (main thread only; elsewhere signals keep their handlers)."""

    def __init__(self, repeat_window_s: float = REPEAT_WINDOW_S) -> None:
        self.signal_number: Optional[int] = None
        self.requested_at: Optional[float] = None  # time.monotonic() of the first signal
        self.repeat_window_s = repeat_window_s
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def seconds_since_request(self) -> float:
        return 0.0 if self.requested_at is None else time.monotonic() - self.requested_at

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
            since = self.seconds_since_request()
            if since < self.repeat_window_s:
                _say(f"{name} {since:.2f} s after {signal.Signals(self.signal_number).name}: the same stop request "
                     "(a launcher forwarding it); still saving")
                return
            _say(f"{name} again: exiting now without saving (earlier checkpoints are intact)")
            os._exit(128 + signal_number)
        self.signal_number, self.requested_at = signal_number, time.monotonic()
        _say(f"{name}: finishing this step and saving a checkpoint (a signal more than {self.repeat_window_s:g} s "
             "from now exits at once)")


def _say(line: str) -> None:
    sys.stderr.write(f"\n{line}\n")
    sys.stderr.flush()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """For helper processes (a DataLoader's ``worker_init_fn``): a preemption that signals the whole process group
    must not kill them under the training process (torch would raise "DataLoader worker ... is killed by signal"
    in the middle of its save); the training process stops them itself once its checkpoint is saved."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
