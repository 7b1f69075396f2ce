"""Item 5 of issue 6 (transport) on 127.0.0.1 with real Flower processes: a SuperLink whose certificate names
another host is refused by a SuperNode (``flower-client``) and by ``flower-server``'s own start-up check, although
the certificate chains to the federation's CA. (TLS by default, ``--insecure`` warnings: test_deploy_cli.py;
an unregistered site key and plain HTTP refused: test_deploy_loopback.py; telemetry off in every started process:
test_deploy_resume.py and tests/server/test_resume_after_kill.py.)"""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.launch import TLSFiles, start_superlink
from strpnet_core.console import flower_env, flower_executable, free_port, stop_process

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _certificate_for(certs: Path, host: str) -> TLSFiles:
    """A server certificate for ``host`` only (no localhost / 127.0.0.1), signed by ``certs``' CA."""
    key, csr, pem, ext = (certs / f"{host}.{s}" for s in ("key", "csr", "pem", "ext"))
    ext.write_text(f"subjectAltName=DNS:{host}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-sha256", "-nodes", "-keyout", str(key), "-out",
                    str(csr), "-subj", f"/CN={host}"], check=True, capture_output=True, timeout=60)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(certs / "ca.crt"), "-CAkey",
                    str(certs / "ca.key"), "-CAcreateserial", "-out", str(pem), "-days", "2", "-sha256", "-extfile",
                    str(ext)], check=True, capture_output=True, timeout=60)
    return TLSFiles(certs / "ca.crt", pem, key)


def test_certificate_for_another_host_is_refused(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    subprocess.run([str(REPO / "deploy" / "make_certs.sh"), str(certs)], check=True, capture_output=True,
                   timeout=120)
    wrong = _certificate_for(certs, "otherhost")
    # The chain is valid: the only fault is the host name.
    subprocess.run(["openssl", "verify", "-CAfile", str(wrong.ca_cert), str(wrong.server_cert)], check=True,
                   capture_output=True, timeout=30)

    # flower-server's start-up check refuses it at once, naming the cause (and stops the SuperLink it started).
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="certificate is refused.*SAN"):
        start_superlink(tmp_path / "home-check", port=free_port(), tls=wrong, ready_timeout_s=90)
    print(f"flower-server start-up check refused the certificate after {time.monotonic() - t0:.1f} s")

    # A SuperLink serving that certificate (started directly) ...
    port = free_port()
    home = tmp_path / "home-link"
    with open(tmp_path / "superlink.log", "wb") as fh:
        link = subprocess.Popen([flower_executable("flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
                                 "--disable-runtime-dependency-installation", "--ssl-ca-certfile",
                                 str(wrong.ca_cert), "--ssl-certfile", str(wrong.server_cert), "--ssl-keyfile",
                                 str(wrong.server_key)], env=flower_env(home), stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    client = None
    try:
        deadline = time.monotonic() + 60
        while True:  # up (TLS without verification) ...
            assert link.poll() is None and time.monotonic() < deadline, (tmp_path / "superlink.log").read_text()
            try:
                if httpx.get(f"https://127.0.0.1:{port}/health", verify=False, timeout=1).is_success:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        # ... but not trusted for 127.0.0.1 by a client holding the CA.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"https://127.0.0.1:{port}/health", verify=ssl.create_default_context(cafile=str(wrong.ca_cert)),
                      timeout=5)

        # ... is refused by a site: its SuperNode never joins and gives up after --max-wait.
        (tmp_path / "cache-a").mkdir()
        exe = Path(sys.executable).parent / "flower-client"
        cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "client.supernode"]
        cmd += ["--superlink", f"127.0.0.1:{port}", "--ca", str(wrong.ca_cert), "--site-name", "a", "--cache-dir",
                str(tmp_path / "cache-a"), "--skip-prepare", "--max-wait", "15", "--retry-seconds", "0"]
        with open(tmp_path / "site.log", "wb") as fh:
            client = subprocess.Popen(cmd, env=flower_env(tmp_path / "home-site"), stdout=fh,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        rc = client.wait(timeout=120)
        site_log = (tmp_path / "site.log").read_text(errors="replace")
        assert rc != 0, site_log[-3000:]
        assert "CERTIFICATE_VERIFY_FAILED" in site_log or "certificate verify failed" in site_log.lower(), \
            site_log[-3000:]
    finally:
        if client is not None:
            stop_process(client)
        stop_process(link)
