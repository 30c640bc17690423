"""The stop request: one preemption delivered twice (group + launcher) is one request; a later signal exits at once."""

import signal

import pytest

from moebsr.training import interrupt
from moebsr.training.interrupt import StopRequest


class ExitedNow(Exception):
    pass


@pytest.fixture
def exits(monkeypatch):
    codes = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        raise ExitedNow

    monkeypatch.setattr(interrupt.os, "_exit", fake_exit)
    return codes


def test_signals_within_the_window_are_one_request_whichever_they_are(exits, capsys):
    with StopRequest(repeat_window_s=60.0) as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGINT)  # Ctrl-C reaches the training process from the terminal...
        signal.raise_signal(signal.SIGTERM)  # ...and accelerate 1.16's launcher sends SIGTERM right after
        signal.raise_signal(signal.SIGTERM)
        assert stop.signal_number == signal.SIGINT and exits == []
        assert 0.0 <= stop.seconds_since_request() < 60.0
    said = capsys.readouterr().err
    assert said.count("SIGINT: finishing this step and saving a checkpoint") == 1
    assert said.count("SIGTERM 0.") == 2 and said.count("after SIGINT: the same stop request") == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGINT) is \
        signal.default_int_handler


def test_a_signal_after_the_window_exits_at_once_with_its_code(exits, capsys, monkeypatch):
    with StopRequest(repeat_window_s=0.5) as stop:
        signal.raise_signal(signal.SIGTERM)
        monkeypatch.setattr(interrupt.time, "monotonic", lambda: stop.requested_at + 0.6)
        with pytest.raises(ExitedNow):
            signal.raise_signal(signal.SIGINT)
    assert exits == [130]
    assert "SIGINT again: exiting now without saving (earlier checkpoints are intact)" in capsys.readouterr().err

