"""``strpnet_core.console.raise_on_stop_signals``, the stop guard of ``flower-server``: a stop signal raises once in
the main thread, is not lost when Python ignores its exception (a fork's after-fork hook, a ``__del__``), is not
raised into the clean-up, and a third signal stops at once."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from strpnet_core.console import StopRequested, raise_on_stop_signals


def _wait_for_stop(seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)  # a signal sent again raises here


class _SignalledOnCollection:
    def __del__(self) -> None:
        signal.raise_signal(signal.SIGTERM)  # the handler's exception is ignored inside __del__


def test_the_guard_raises_once_and_restores_the_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), sys.unraisablehook
    with raise_on_stop_signals():
        with pytest.raises(StopRequested) as stop:
            signal.raise_signal(signal.SIGTERM)
        assert stop.value.signum == signal.SIGTERM
        signal.raise_signal(signal.SIGINT)  # the stop is under way: logged, not raised into its clean-up
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), sys.unraisablehook) == before


def test_signals_after_stopping_are_not_raised_into_the_clean_up() -> None:
    with raise_on_stop_signals() as guard:
        guard.stopping()  # e.g. the first line of the finally block that stops the SuperLink
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)


def test_a_stop_signal_whose_exception_python_ignores_is_delivered_again() -> None:
    with raise_on_stop_signals():
        obj = _SignalledOnCollection()
        with pytest.raises(StopRequested):
            del obj
            _wait_for_stop()


def test_a_lost_stop_is_raised_on_leaving_the_block_and_never_after() -> None:
    """The block ends before the signal is sent again: leaving it raises the stop, and no signal arrives later."""
    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: got.append(signum))
    try:
        with pytest.raises(StopRequested):
            with raise_on_stop_signals():
                obj = _SignalledOnCollection()
                del obj  # lost; the block ends at once
        time.sleep(0.3)  # past the 0.1 s of the resend
        assert got == []
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=60)


def test_a_stop_signal_during_a_fork_is_not_lost() -> None:
    """What lost the coordinator's stop: SIGTERM while ``subprocess`` forks, its handler run by an after-fork hook
    (whose exceptions Python ignores). In a fresh interpreter, since an at-fork hook cannot be unregistered."""
    proc = _run("""
        import os, signal, subprocess, sys, time
        from strpnet_core.console import StopRequested, raise_on_stop_signals
        os.register_at_fork(after_in_parent=lambda: signal.raise_signal(signal.SIGTERM))
        with raise_on_stop_signals():
            try:
                # preexec_fn as die_with_parent_kwargs gives: only then does subprocess run the at-fork hooks
                subprocess.run([sys.executable, "-c", "pass"], check=True, preexec_fn=lambda: None)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    time.sleep(0.01)
            except StopRequested as exc:
                sys.exit(128 + exc.signum)
        sys.exit(0)
    """)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr


def test_a_third_signal_stops_at_once() -> None:
    proc = _run("""
        import signal, time
        from strpnet_core.console import StopRequested, raise_on_stop_signals
        with raise_on_stop_signals():
            try:
                signal.raise_signal(signal.SIGTERM)
            except StopRequested:
                signal.raise_signal(signal.SIGTERM)  # logged
                signal.raise_signal(signal.SIGTERM)  # the default action: the process ends here
                time.sleep(5)
    """)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert "already stopping" in proc.stderr and "a third time" in proc.stderr
