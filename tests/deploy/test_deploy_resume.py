"""Item 2 of issue 6 in a real deployment on 127.0.0.1: ``flower-server`` (TLS SuperLink + SuperNode
authentication, kept database) is killed with SIGKILL (its process group) after the round-1 checkpoint while two
``flower-client`` sites keep running; no Flower process of the coordinator survives, ``flower-server --resume``
stops the stale run, the same sites reconnect, and the final weights equal those of an uninterrupted simulation of
the same seed, caches and configuration. Every process is started here and stopped by its PID."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.checkpoint import load_checkpoint
from strpnet_core.commands.simulate import simulate
from strpnet_core.console import flower_env, free_port, stop_process
from strpnet_core.reaper import flower_processes, process_environ

from deploy_helpers import REPO, console_command, start_logged, write_site_cache  # tests/deploy/deploy_helpers.py
from sim_fixtures import assert_same_final_model

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]

#: 2 rounds: the kill follows the round-1 checkpoint within ~1 s, and a round of this deployment takes > 20 s
#: (a fresh ClientApp process per message), so round 2 is always left to the resumed run.
ROUNDS = 2
SEED = 3
RUN_CONFIG: dict[str, object] = {"preset": "ci", "seed": SEED, "val-fraction": 0.4, "local-epochs": 1,
                                 "num-threads": 1, "model.widths": "4,8", "model.lstm-hidden": 8,
                                 "model.risk-hidden": 8}


def _round(run_dir: Path) -> int:
    ckpt = load_checkpoint(run_dir)
    return -1 if ckpt is None else ckpt.server_round


def test_killed_coordinator_resumes_with_the_same_sites(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    subprocess.run([str(REPO / "deploy" / "make_certs.sh"), str(certs), "--site", "a", "--site", "b"],
                   check=True, capture_output=True, timeout=120)
    caches = {s: write_site_cache(tmp_path / "cache" / s, s, seed=i) for i, s in enumerate(("a", "b"))}
    port = free_port()
    state, run_dir = tmp_path / "coordinator", tmp_path / "run"
    env = flower_env(tmp_path / "flwr-home-test")
    server_cmd = console_command("flower-server", "server.coordinator") + [
        "--certs", str(certs), "--site-key", str(certs / "sites/a/a.pub"), "--site-key", str(certs / "sites/b/b.pub"),
        "--host", "127.0.0.1", "--port", str(port), "--state-dir", str(state), "--run-dir", str(run_dir),
        "--rounds", str(ROUNDS), "--timeout", "900", "--app-dir", str(REPO),
    ]
    for key, value in RUN_CONFIG.items():
        server_cmd += ["-c", f"{key}={json.dumps(value)}"]
    client = console_command("flower-client", "client.supernode")
    server_log = tmp_path / "server.log"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        procs["server"] = start_logged(server_cmd, server_log, env)
        for s in ("a", "b"):
            procs[s] = start_logged(client + ["--superlink", f"127.0.0.1:{port}", "--cache-dir", str(caches[s]),
                                        "--site-name", s, "--ca", str(certs / "ca.crt"),
                                        "--key", str(certs / f"sites/{s}/{s}.key"), "--preset", "ci"],
                              tmp_path / f"{s}.log", env)
        deadline = time.monotonic() + 600
        while _round(run_dir) < 1:
            assert procs["server"].poll() is None and time.monotonic() < deadline, \
                server_log.read_text(errors="replace")[-4000:]
            time.sleep(0.2)
        started = flower_processes(state / "flower")
        site_pids = [pid for s in ("a", "b") for pid in flower_processes(caches[s] / ".flower")]
        # a short-lived process (a ClientApp's) may have exited since it was listed: no environment left to read
        envs = {pid: e for pid in started + site_pids if (e := process_environ(pid)) is not None}
        os.killpg(procs["server"].pid, signal.SIGKILL)
        procs["server"].wait(timeout=30)
        t_kill = time.monotonic()
        deadline = time.monotonic() + 30
        while (left := flower_processes(state / "flower")) and time.monotonic() < deadline:
            time.sleep(0.2)
        gone_s = time.monotonic() - t_kill
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes of the killed coordinator survived: {left}"
        assert len(started) >= 3, started  # flower-superlink, flower-superexec, flwr run (+ flwr-serverapp)
        assert len(site_pids) >= 4, site_pids  # per site: the supervisor and flower-supernode
        assert len(envs) >= 5, envs  # the long-lived ones at least
        for pid, e in envs.items():  # coordinator and sites: telemetry off, no runtime installs
            assert e.get("FLWR_TELEMETRY_ENABLED") == "0", (pid, e.get("FLWR_TELEMETRY_ENABLED"))
            assert e.get("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION") == "1", pid
        killed_at = _round(run_dir)
        assert 1 <= killed_at < ROUNDS, f"the kill came after round {killed_at}: nothing left to resume"
        started_runs = re.findall(r"Successfully started run (\d+)", server_log.read_text(errors="replace"))
        assert len(started_runs) == 1, started_runs
        killed_run = int(started_runs[0])

        procs["server"] = start_logged(server_cmd + ["--resume"], server_log, env)
        rc = procs["server"].wait(timeout=900)
        resumed_s = time.monotonic() - t_kill
        text = server_log.read_text(errors="replace")
        assert rc == 0, text[-4000:]
        assert f"resuming {run_dir} from round {killed_at}" in text
        # The killed run is closed either way: stopped by the coordinator if still open, or already failed by the
        # SuperLink once the dead ServerApp's heartbeat expired (a race with the restart).
        stopped = f"run {killed_run} of a previous session was still open" in text
        failed = f"run {killed_run} of a previous session is finished:failed" in text
        assert stopped != failed, text[-4000:]
        for s in ("a", "b"):  # the sites outlived the coordinator and are still there
            assert procs[s].poll() is None, (tmp_path / f"{s}.log").read_text(errors="replace")[-3000:]
    finally:
        for proc in procs.values():
            stop_process(proc)
    print(f"\nkilled after the round-{killed_at} checkpoint; {len(started)} coordinator processes, all gone "
          f"{gone_s:.1f} s after the kill; run {killed_run} " + ("stopped by the resumed coordinator" if stopped else
          "already failed by the SuperLink") + f"; the resumed run finished {resumed_s:.0f} s after the kill")

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_round"] == killed_at and summary["rounds_completed"] == ROUNDS
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert all(r["train_sites"] == 2 and r["eval_sites"] == 2 for r in rows), rows

    # The same federation, uninterrupted, in simulation: identical weights (seeded per site name and round;
    # FedAvg sums in a content-defined order).
    reference = tmp_path / "reference"
    overrides = {k: v for k, v in RUN_CONFIG.items() if k not in ("preset", "seed")}
    simulate(reference, data=None, cache=tmp_path / "cache", sites=2, rounds=ROUNDS, preset="ci", seed=SEED,
             overrides=overrides, timeout_s=300, progress=False)
    assert_same_final_model(reference, run_dir)
