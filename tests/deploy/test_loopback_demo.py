"""``deploy/loopback_demo.sh``: a site that cannot take part ends the demo at once, naming the site and showing its
log, and the coordinator it started is stopped (the run needs every site; without this the demo waited for the
quorum and ended on the coordinator's error). The script stops its processes by PID."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from strpnet_core.console import free_port

from deploy_helpers import REPO  # tests/deploy/deploy_helpers.py

pytestmark = pytest.mark.integration


def test_a_site_that_stops_ends_the_demo_with_its_reason(tmp_path: Path) -> None:
    from server.launch import check_port_free

    data = tmp_path / "data"
    for site in ("site-01", "site-02"):
        (data / site).mkdir(parents=True)  # no patient: the site cannot take part
    port = free_port()
    env = {**os.environ, "BIN": str(Path(sys.executable).parent), "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.run([str(REPO / "deploy" / "loopback_demo.sh"), "--work", str(tmp_path / "work"), "--data",
                           str(data), "--sites", "2", "--rounds", "1", "--port", str(port)],
                          capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "stopped (exit code 1) before the run ended" in out, out[-3000:]
    assert "the run needs all 2 sites" in out, out[-3000:]
    site = out.split(" stopped (exit code 1)")[0].rsplit("== ", 1)[1]
    assert site in ("site-01", "site-02")
    assert str(data / site) in out  # its log's last lines name the folder and why it has no patient
    check_port_free("127.0.0.1", port)  # the coordinator and its SuperLink are gone with the demo
