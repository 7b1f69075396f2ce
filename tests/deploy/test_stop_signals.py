"""A requested stop: ``flower-client`` stops on SIGTERM while it waits to retry a SuperNode that could not join (no
new SuperNode is started after the signal; a real ``flower-supernode`` against a closed port on 127.0.0.1), and
``flower-server`` stops with its SuperLink; both exit with 128 + the signal (the coordinator's guard:
tests/core/test_console.py). Every process is stopped by PID."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from strpnet_core.console import flower_env, free_port, stop_process

from deploy_helpers import console_command, start_logged, write_site_cache  # tests/deploy/deploy_helpers.py

pytestmark = pytest.mark.integration


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

