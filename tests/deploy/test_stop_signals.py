"""A requested stop: ``flower-client`` stops on SIGTERM while it waits to retry a SuperNode that could not join (no
new SuperNode is started after the signal; a real ``flower-supernode`` against a closed port on 127.0.0.1), and
``flower-server`` stops with its SuperLink; both exit with 128 + the signal. The coordinator's guard
(``strpnet_core.console.raise_on_stop_signals``) does not lose a signal whose exception Python ignores (one landing
in a fork's after-fork hook). Every process is stopped by PID."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from strpnet_core.console import StopRequested, raise_on_stop_signals
from strpnet_core.federation import flower_env, free_port, stop_process

from deploy_helpers import console_command, start_logged, write_site_cache  # tests/deploy/deploy_helpers.py


def _sigterm_when_logged(cmd: list[str], log: Path, home: Path, line: str) -> int:
    """Start ``cmd`` (output to ``log``), send it SIGTERM once ``line`` is in its log; its exit code."""
    proc = start_logged(cmd, log, flower_env(home))
    try:
        deadline = time.monotonic() + 120
        while line not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=60)
    finally:
        stop_process(proc)


def test_sigterm_during_the_retry_wait_stops_the_site(tmp_path: Path) -> None:
    cache = write_site_cache(tmp_path / "cache" / "a", "a")
    log = tmp_path / "client.log"
    cmd = console_command("flower-client", "client.supernode") + [
        "--superlink", f"127.0.0.1:{free_port()}", "--insecure", "--cache-dir", str(cache), "--site-name", "a",
        "--skip-prepare", "--max-wait", "1", "--retry-seconds", "600"]
    rc = _sigterm_when_logged(cmd, log, tmp_path / "home", "(not yet registered at the coordinator?")
    text = log.read_text(errors="replace")
    assert text.count("starting the SuperNode") == 1, text[-3000:]  # none after the signal
    assert rc == 128 + signal.SIGTERM  # a requested stop, as a shell reports a process ended by SIGTERM


def test_sigterm_stops_the_coordinator_and_its_superlink(tmp_path: Path) -> None:
    """flower-server waiting for its sites is stopped by SIGTERM: exit 128 + 15, and its SuperLink's port is free."""
    from deploy_helpers import REPO
    from server.launch import check_port_free

    port = free_port()
    log = tmp_path / "server.log"
    cmd = console_command("flower-server", "server.coordinator") + [
        "--insecure", "--no-auth", "--host", "127.0.0.1", "--port", str(port), "--state-dir", str(tmp_path / "state"),
        "--run-dir", str(tmp_path / "run"), "--rounds", "1", "--min-sites", "1", "--timeout", "120",
        "--app-dir", str(REPO)]
    rc = _sigterm_when_logged(cmd, log, tmp_path / "home", "site(s) connected; waiting up to")
    assert rc == 128 + signal.SIGTERM, log.read_text(errors="replace")[-3000:]
    check_port_free("127.0.0.1", port)  # the SuperLink it started is gone with it


def _wait_for_stop(seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)  # a redelivered signal raises here


def test_the_guard_raises_once_and_restores_the_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM), sys.unraisablehook
    with raise_on_stop_signals():
        with pytest.raises(StopRequested) as stop:
            signal.raise_signal(signal.SIGTERM)
        assert stop.value.signum == signal.SIGTERM
        signal.raise_signal(signal.SIGINT)  # the stop is under way: logged, not raised into its clean-up
    assert (signal.getsignal(signal.SIGTERM), sys.unraisablehook) == before


def test_a_stop_signal_whose_exception_python_ignores_is_delivered_again() -> None:
    """The signal lands in a ``__del__``: Python reports the exception as unraisable and goes on; the guard sends
    the signal again, and it raises in ordinary code."""

    class SignalledOnCollection:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGTERM)

    with raise_on_stop_signals():
        obj = SignalledOnCollection()
        with pytest.raises(StopRequested):
            del obj  # the handler's exception is ignored inside __del__
            _wait_for_stop()


def test_a_stop_signal_during_a_fork_is_not_lost() -> None:
    """What lost the coordinator's stop: SIGTERM while ``subprocess`` forks, its handler run by an after-fork hook
    (whose exceptions Python ignores). In a fresh interpreter, since an at-fork hook cannot be unregistered."""
    script = textwrap.dedent("""
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
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
