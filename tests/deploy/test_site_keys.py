"""The coordinator's site keys against a real TLS SuperLink with SuperNode authentication (127.0.0.1): a key dropped
from ``--site-key`` is unregistered (when asked) and its SuperNode refused, a kept key still connects, a revoked key is not
silently taken back. Every process is started here and stopped by its PID."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from server.launch import TLSFiles, start_superlink, write_flwr_config
from server.site_keys import key_fingerprint, listed_nodes, record_path, sync_site_keys
from strpnet_core.federation import flower_env, flower_executable, stop_process

from deploy_helpers import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_fingerprint_is_ssh_keygens(tmp_path: Path) -> None:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen (openssh-client) not installed")
    subprocess.run(["bash", str(REPO / "deploy/make_certs.sh"), str(tmp_path), "--site", "a", "--keys-only"],
                   check=True, capture_output=True)
    pub = tmp_path / "sites/a/a.pub"
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)], check=True, capture_output=True,
                         text=True).stdout.split()
    assert key_fingerprint(pub) == out[1]
    bad = tmp_path / "notes.txt"
    bad.write_text("hello\n")
    with pytest.raises(ValueError, match="notes.txt: not an OpenSSH public key"):
        key_fingerprint(bad)


def test_a_dropped_site_key_is_revoked_and_its_supernode_refused(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(REPO / "deploy/make_certs.sh"), str(certs), "--site", "a", "--site", "b"],
                   check=True, capture_output=True)
    tls = TLSFiles.from_dir(certs)
    keys = {s: certs / f"sites/{s}/{s}.pub" for s in ("a", "b")}
    home, database = tmp_path / "flower", tmp_path / "superlink.db"
    record = record_path(database)
    port = _free_port()
    write_flwr_config(home, f"127.0.0.1:{port}", root_certificates=tls.ca_cert)
    superlink = start_superlink(home, port=port, tls=tls, enable_supernode_auth=True, database=database)
    nodes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        first = sync_site_keys(list(keys.values()), home, record, fresh_database=True)
        ids = {Path(k).stem: n for k, n in first.registered}
        assert sorted(ids) == ["a", "b"] and not first.revoked and not first.unknown
        assert json.loads(record.read_text())["registered"][key_fingerprint(keys["a"])]["node_id"] == ids["a"]

        # The same keys again (a restart on the kept database): nothing changes.
        again = sync_site_keys(list(keys.values()), home, record, fresh_database=False)
        assert not again.registered and not again.revoked and sorted(n for _, n in again.kept) == sorted(ids.values())

        # Site b is dropped from the list: refused until the revocation is asked for, then its node is unregistered.
        with pytest.raises(ValueError, match=r"not given: .*b\.pub \(node \d+, SHA256:.*--revoke-missing"):
            sync_site_keys([keys["a"]], home, record, fresh_database=False)
        assert listed_nodes(home) == {ids["a"]: "registered", ids["b"]: "registered"}
        second = sync_site_keys([keys["a"]], home, record, fresh_database=False, revoke_missing=True)
        assert second.revoked == [(str(keys["b"].resolve()), ids["b"])]
        assert second.kept == [(str(keys["a"].resolve()), ids["a"])] and not second.unknown
        assert listed_nodes(home) == {ids["a"]: "registered", ids["b"]: "unregistered"}

        # b's SuperNode is refused; a's still connects.
        for s in ("a", "b"):
            cmd = [flower_executable("flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--isolation",
                   "subprocess", "--host", "127.0.0.1", "--port", str(_free_port()),
                   "--root-certificates", str(tls.ca_cert), "--auth-supernode-private-key",
                   str(certs / f"sites/{s}/{s}.key"), "--max-wait-time", "20"]
            with open(tmp_path / f"{s}.log", "wb") as log:
                nodes[s] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=flower_env(tmp_path / f"home-{s}"), start_new_session=True)
        assert nodes["b"].wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (tmp_path / "b.log").read_text(errors="replace")
        deadline = time.monotonic() + 120
        while listed_nodes(home).get(ids["a"]) != "online":
            assert nodes["a"].poll() is None and time.monotonic() < deadline, \
                (tmp_path / "a.log").read_text(errors="replace")
            time.sleep(1)

        # Giving b's key back is refused with the reason (Flower never registers a key it has seen again) ...
        with pytest.raises(ValueError, match="was revoked at .* new key pair"):
            sync_site_keys(list(keys.values()), home, record, fresh_database=False)
        # ... and a node registered by hand is reported, not taken for a site of the list.
        subprocess.run(["bash", str(REPO / "deploy/make_certs.sh"), str(certs), "--site", "c", "--keys-only"],
                       check=True, capture_output=True)
        subprocess.run([flower_executable("flwr"), "supernode", "register", str(certs / "sites/c/c.pub"), "strpnet"],
                       env=flower_env(home), check=True, capture_output=True)
        third = sync_site_keys([keys["a"]], home, record, fresh_database=False)
        assert len(third.unknown) == 1 and third.unknown[0] not in ids.values()
    finally:
        for proc in (*nodes.values(), superlink):
            stop_process(proc)
