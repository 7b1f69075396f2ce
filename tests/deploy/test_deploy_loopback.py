"""Real deployment on 127.0.0.1: a TLS SuperLink with SuperNode authentication (``flower-server``) and two sites
(``flower-client``), 2 rounds of a tiny configuration; a site with an unregistered key and a plain-HTTP site are
refused. Every process is started here and stopped by its PID."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from strpnet_core.console import flower_env, free_port, stop_process

# tests/deploy/deploy_helpers.py
from deploy_helpers import REPO, console_command, start_logged, tls_server_command, write_site_cache

pytestmark = pytest.mark.integration



def test_tls_authenticated_deployment(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    subprocess.run([str(REPO / "deploy" / "make_certs.sh"), str(certs), "--site", "a", "--site", "b", "--site",
                    "intruder"], check=True, capture_output=True, timeout=120)
    caches = {s: write_site_cache(tmp_path / "cache" / s, s, seed=i) for i, s in enumerate(("a", "b"))}
    intruder_cache = write_site_cache(tmp_path / "cache" / "intruder", "intruder", seed=9)
    port = free_port()
    env = flower_env(tmp_path / "flwr-home-test")
    server_cmd = tls_server_command(certs, tmp_path, port=port, rounds=2)
    client = console_command("flower-client", "client.supernode")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        procs["server"] = start_logged(server_cmd, tmp_path / "server.log", env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait for the TLS endpoint
            try:
                httpx.get(f"https://127.0.0.1:{port}/health",
                          verify=ssl.create_default_context(cafile=str(certs / "ca.crt")), timeout=1)
                break
            except httpx.HTTPError:
                assert procs["server"].poll() is None, (tmp_path / "server.log").read_text()
                time.sleep(0.5)
        while "submitting the run" not in (tmp_path / "server.log").read_text(errors="replace"):
            assert procs["server"].poll() is None and time.monotonic() < deadline, \
                (tmp_path / "server.log").read_text(errors="replace")
            time.sleep(0.5)  # the site keys are registered from here on
        # Plain HTTP to the TLS port is refused.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=3)
        for s in ("a", "b"):
            procs[s] = start_logged(client + ["--superlink", f"127.0.0.1:{port}", "--cache-dir", str(caches[s]),
                                        "--site-name", s, "--ca", str(certs / "ca.crt"),
                                        "--key", str(certs / f"sites/{s}/{s}.key"), "--preset", "ci"],
                              tmp_path / f"{s}.log", env)
        procs["intruder"] = start_logged(client + ["--superlink", f"127.0.0.1:{port}",
                                                   "--cache-dir", str(intruder_cache),
                                             "--site-name", "intruder", "--ca", str(certs / "ca.crt"),
                                             "--key", str(certs / "sites/intruder/intruder.key"), "--preset", "ci",
                                             "--max-wait", "20", "--retry-seconds", "0"],
                                   tmp_path / "intruder.log", env)
        procs["plain"] = start_logged(client + ["--superlink", f"127.0.0.1:{port}", "--cache-dir", str(intruder_cache),
                                          "--site-name", "plain", "--insecure", "--preset", "ci", "--max-wait", "20",
                                          "--retry-seconds", "0",
                                          # its own Flower home: the intruder's reaper sweeps the processes of the
                                          # cache's default one when its SuperNode is refused
                                          "--state-dir", str(tmp_path / "plain-flower")],
                                tmp_path / "plain.log", env)
        rc = procs["server"].wait(timeout=630)  # bounds only: 2 tiny rounds take ~1 min; over 4 min at load ~8
        server_log = (tmp_path / "server.log").read_text(errors="replace")
        assert rc == 0, server_log[-4000:]
        for name in ("intruder", "plain"):
            assert procs[name].wait(timeout=60) != 0, (tmp_path / f"{name}.log").read_text(errors="replace")
        assert "Failed to activate SuperNode" in (tmp_path / "intruder.log").read_text(errors="replace")
    finally:
        for proc in procs.values():
            stop_process(proc)

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # Only the two registered sites took part (the strategy samples every connected node).
    assert [r["train_sites"] for r in rows] == [2, 2] and [r["eval_sites"] for r in rows] == [2, 2]
    assert (tmp_path / "run" / "final_model.pt").is_file()
    # The coordinator names the sites after their key files (sites.json, for the report): the nodes that took part.
    names = json.loads((tmp_path / "run" / "sites.json").read_text())["site_names"]
    assert sorted(names.values()) == ["a", "b"]
    assert {str(s["node"]) for s in rows[-1]["per_site"]} == set(names)
    assert "registered site key" in server_log and "round 2/2" in server_log
    assert os.path.isfile(tmp_path / "coordinator" / "superlink.db")
