"""The one wait loop: answers, deadlines, stop events and errors."""

from __future__ import annotations

import threading

import pytest

from drugprot.polling import poll


def test_returns_the_first_answer_and_stops_asking():
    calls = []

    def attempt():
        calls.append(1)
        return "up" if len(calls) == 3 else None

    assert poll(attempt, timeout=30, interval=0.01) == "up" and len(calls) == 3


def test_gives_up_at_the_deadline_after_asking_at_least_once():
    calls = []
    assert poll(lambda: calls.append(1), timeout=0.05, interval=0.01) is None
    assert 1 <= len(calls)
    assert poll(lambda: calls.append(1), timeout=0, interval=0.01) is None


def test_a_stop_event_ends_the_wait():
    stop = threading.Event()
    calls = []

    def attempt():
        calls.append(1)
        if len(calls) == 2:
            stop.set()

    assert poll(attempt, timeout=30, interval=0.01, stop=stop) is None and len(calls) == 2


def test_an_error_in_the_attempt_ends_the_wait():
    def attempt():
        raise RuntimeError("server exited with 1")

    with pytest.raises(RuntimeError, match="server exited with 1"):
        poll(attempt, timeout=30)
