"""The coordinator behind ``deploy/nginx-superlink.conf``: the sites reach only the Fleet API. A TLS SuperLink on
127.0.0.1 (``flower-server``), nginx filled in from the shipped template in front of it, two sites (``flower-client``)
that dial the proxy, 1 round of a tiny configuration; through the proxy the Control and runtime APIs answer 403.
Skipped where nginx is not installed (it is not a Python dependency: ``apt-get install nginx-light``). Every process
is started here and stopped by its PID."""

from __future__ import annotations

import json
import shutil
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

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)


def _nginx_conf(tmp: Path, certs: Path, listen_port: int, superlink_port: int) -> Path:
    """The shipped template with its placeholders filled in, plus what a non-root nginx needs (pid, logs and
    temporary folders under ``tmp``)."""
    text = (REPO / "deploy" / "nginx-superlink.conf").read_text()
    text = (text.replace("LISTEN_ADDRESS:9092", f"127.0.0.1:{listen_port}")
            .replace("SUPERLINK_PORT", str(superlink_port)).replace("CERTS", str(certs)))
    local = [f"pid {tmp}/nginx.pid;", f"error_log {tmp}/nginx-error.log;"]
    paths = [f"access_log {tmp}/access.log;"] + [f"{k}_temp_path {tmp}/{k};" for k in
                                                   ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")]
    text = text.replace("worker_processes 1;", "worker_processes 1;\n" + "\n".join(local), 1)
    text = text.replace("http {", "http {\n  " + "\n  ".join(paths), 1)
    conf = tmp / "nginx.conf"
    conf.write_text(text)
    return conf


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
def test_sites_reach_only_the_fleet_api_through_the_proxy(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    subprocess.run([str(REPO / "deploy" / "make_certs.sh"), str(certs), "--site", "a", "--site", "b"], check=True,
                   capture_output=True, timeout=120)
    caches = {s: write_site_cache(tmp_path / "cache" / s, s, seed=i) for i, s in enumerate(("a", "b"))}
    superlink_port, proxy_port = free_port(), free_port()
    while proxy_port == superlink_port:
        proxy_port = free_port()
    (tmp_path / "nginx").mkdir()
    conf = _nginx_conf(tmp_path / "nginx", certs, proxy_port, superlink_port)
    env = flower_env(tmp_path / "flwr-home-test")
    server_cmd = tls_server_command(certs, tmp_path, port=superlink_port, rounds=1)
    client = console_command("flower-client", "client.supernode")
    verify = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        # nginx in the foreground (daemon off), so that it is this test's child, stopped by its PID
        procs["nginx"] = start_logged([str(NGINX), "-c", str(conf), "-g", "daemon off;"], tmp_path / "nginx.log", env)
        procs["server"] = start_logged(server_cmd, tmp_path / "server.log", env)
        deadline = time.monotonic() + 90
        while "submitting the run" not in (tmp_path / "server.log").read_text(errors="replace"):
            assert procs["server"].poll() is None and time.monotonic() < deadline, \
                (tmp_path / "server.log").read_text(errors="replace")
            assert procs["nginx"].poll() is None, (tmp_path / "nginx.log").read_text(errors="replace")
            time.sleep(0.5)
        proxy = f"https://localhost:{proxy_port}"
        assert httpx.get(f"{proxy}/health", verify=verify, timeout=10).status_code == 200
        for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/runtime/acquire-task", "/docs"):
            assert httpx.post(proxy + path, verify=verify, timeout=10).status_code == 403, path
            # the same request on the SuperLink's own port (this host only) reaches the SuperLink
            direct = httpx.post(f"https://localhost:{superlink_port}{path}", verify=verify, timeout=10)
            assert direct.status_code != 403, path
        for s in ("a", "b"):
            procs[s] = start_logged(client + ["--superlink", f"127.0.0.1:{proxy_port}", "--cache-dir", str(caches[s]),
                                              "--site-name", s, "--ca", str(certs / "ca.crt"),
                                              "--key", str(certs / f"sites/{s}/{s}.key"), "--preset", "ci"],
                                    tmp_path / f"{s}.log", env)
        rc = procs["server"].wait(timeout=630)  # bounds only: 1 tiny round takes ~1 min
        server_log = (tmp_path / "server.log").read_text(errors="replace")
        assert rc == 0, server_log[-4000:]
    finally:
        for proc in procs.values():
            stop_process(proc)

    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["train_sites"] for r in rows] == [2] and [r["eval_sites"] for r in rows] == [2]
    fleet = [line.split('"')[1].split()[1] for line in (tmp_path / "nginx" / "access.log").read_text().splitlines()
             if " 200 " in line and '"POST ' in line]
    assert fleet and all(p.startswith("/v1/fleet/") for p in fleet)  # every request the sites made was Fleet API
