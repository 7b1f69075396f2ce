"""A site dies mid-run (real deployment on 127.0.0.1): ``flower-server`` (plain HTTP, no node authentication, testing
flags) and 3 real ``flower-supernode`` processes; one SuperNode's process group is SIGKILLed during round 2. The run
must not hang: the SuperLink declares the node offline (~1 min), the server waits ``node-wait-timeout`` for it, goes
on with the 2 others (quorum 2), logs the lost node; the site is then restarted and takes part again; all rounds
complete (3 rounds: 3 sites, 2, 3). Every process is started here and stopped by its PID (the killed one by its
process group)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from client.supernode import supernode_command
from strpnet_core.console import flower_env, free_port, stop_process

from deploy_helpers import REPO, console_command, start_logged, write_site_cache  # tests/deploy/deploy_helpers.py

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUNDS = 3
SITES = ("a", "b", "c")
VICTIM = "c"
QUORUM = len(SITES) - 1  # the run goes on without the victim


def _wait_for(text: str, log: Path, server: subprocess.Popen[bytes], deadline: float) -> None:
    while text not in log.read_text(errors="replace"):
        assert server.poll() is None, f"server exited before {text!r}:\n{log.read_text(errors='replace')[-4000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in time:\n{log.read_text(errors='replace')[-4000:]}"
        time.sleep(0.5)


def _site(tmp_path: Path, port: int, name: str, cache: Path) -> subprocess.Popen[bytes]:
    args = argparse.Namespace(superlink=f"127.0.0.1:{port}", insecure=True, ca=None, key=None, max_wait=None)
    cmd = supernode_command(args, site_name=name, data_dir=None, cache_dir=cache, port=free_port())
    return start_logged(cmd, tmp_path / f"{name}.log", flower_env(tmp_path / f"home-{name}"))


def test_a_killed_site_does_not_stop_the_run(tmp_path: Path) -> None:
    caches = {s: write_site_cache(tmp_path / "cache" / s, s, seed=i) for i, s in enumerate(SITES)}
    port = free_port()
    server_cmd = console_command("flower-server", "server.coordinator") + [
        "--insecure", "--no-auth", "--host", "127.0.0.1", "--port", str(port),
        "--state-dir", str(tmp_path / "coordinator"), "--run-dir", str(tmp_path / "run"), "--rounds", str(ROUNDS),
        "--min-sites", str(len(SITES)), "--timeout", "860", "--app-dir", str(REPO),
        "-c", "preset=ci", "-c", "val-fraction=0.4", "-c", "local-epochs=1", "-c", "num-threads=1",
        "-c", 'model.widths="4,8" model.lstm-hidden=8 model.risk-hidden=8',
        # quorum: all sites but one; short bounded waits so that the test stays within minutes
        "-c", f"min-train-nodes={QUORUM} min-evaluate-nodes={QUORUM} node-wait-timeout=10.0 start-wait-timeout=120.0",
        "-c", "round-timeout=150.0",
    ]
    server_log = tmp_path / "server.log"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    deadline = time.monotonic() + 900  # a bound only: ~3 min on a quiet 2-core machine, ~8 min under heavy load
    try:
        procs["server"] = start_logged(server_cmd, server_log, flower_env(tmp_path / "flwr-home-test"))
        _wait_for("submitting the run", server_log, procs["server"], time.monotonic() + 90)
        for s in SITES:
            procs[s] = _site(tmp_path, port, s, caches[s])
        _wait_for("[ROUND 2/", server_log, procs["server"], deadline)
        os.killpg(procs[VICTIM].pid, signal.SIGKILL)  # the site dies: SuperNode and its ClientApp processes
        procs[VICTIM].wait(timeout=30)
        _wait_for("lost node", server_log, procs["server"], deadline)
        procs[VICTIM] = _site(tmp_path, port, VICTIM, caches[VICTIM])  # the site comes back later
        rc = procs["server"].wait(timeout=max(1.0, deadline - time.monotonic()))
        text = server_log.read_text(errors="replace")
        assert rc == 0, text[-4000:]
    finally:
        for proc in procs.values():
            stop_process(proc)

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds_completed"] == ROUNDS and summary["stopped"] is None
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert rows[0]["train_sites"] == len(SITES)
    assert min(r["train_sites"] for r in rows) == QUORUM  # went on without the dead site
    assert rows[-1]["train_sites"] == len(SITES) and rows[-1]["eval_sites"] == len(SITES)  # ... which rejoined
    assert "lost node" in text and ("joined" in text or "is back" in text)
    print("\n".join(line for line in text.splitlines() if "[strpnet]" in line))
