"""The coordinator's site keys against a real TLS SuperLink with SuperNode authentication (127.0.0.1): the database
is checked against ``--site-key`` before anything changes; a key dropped from the list stops the start until
``--revoke-missing`` unregisters it, after which its SuperNode is refused while a kept key still connects; a revoked
key is not silently taken back; a site revoked while connected stops with the reason. Every process is started here
and stopped by its PID."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from server.launch import TLSFiles, start_superlink, write_flwr_config
from server.site_keys import KeySync, fingerprint, load_site_key, stored_keys, sync_site_keys
from strpnet_core.console import flower_env, flower_executable, stop_process

from deploy_helpers import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _make_keys(folder: Path, *sites: str, keys_only: bool = True) -> None:
    args = [arg for s in sites for arg in ("--site", s)]
    subprocess.run(["bash", str(REPO / "deploy/make_certs.sh"), str(folder), *args,
                    *(["--keys-only"] if keys_only else [])], check=True, capture_output=True)


def test_site_keys_are_read_as_flower_reads_them(tmp_path: Path) -> None:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen (openssh-client) not installed")
    _make_keys(tmp_path, "a")
    pub = tmp_path / "sites/a/a.pub"
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)], check=True, capture_output=True,
                         text=True).stdout.split()
    assert fingerprint(load_site_key(pub)) == out[1]
    crlf = tmp_path / "crlf.pub"
    crlf.write_bytes(pub.read_bytes().replace(b"\n", b"\r\n"))
    assert load_site_key(crlf) == load_site_key(pub)
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="notes.txt: not an OpenSSH public key"):
        load_site_key(tmp_path / "notes.txt")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "ed")], check=True)
    with pytest.raises(ValueError, match="ed.pub: not an EC public key on a NIST curve"):
        load_site_key(tmp_path / "ed.pub")  # what `flwr supernode register` would refuse


def test_site_names_come_from_the_key_files() -> None:
    done = KeySync(registered=[("/k/hospital-b/hospital-b.pub", 7)], kept=[("/k/a/site.pub", 3), ("/k/b/site.pub", 5)],
                   revoked=[("SHA256:x", 9)])
    assert done.site_names() == {3: "a/site", 5: "b/site", 7: "hospital-b"}  # a shared name: with its folder


def test_a_dropped_site_key_is_revoked_and_its_supernode_refused(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    _make_keys(certs, "a", "b", keys_only=False)
    tls = TLSFiles.from_dir(certs)
    keys = {s: certs / f"sites/{s}/{s}.pub" for s in ("a", "b")}
    home, database = tmp_path / "flower", tmp_path / "superlink.db"
    port = _free_port()
    write_flwr_config(home, f"127.0.0.1:{port}", root_certificates=tls.ca_cert)
    superlink = start_superlink(home, port=port, tls=tls, enable_supernode_auth=True, database=database)
    nodes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        first = sync_site_keys(list(keys.values()), home, database)
        ids = {Path(k).stem: n for k, n in first.registered}
        assert sorted(ids) == ["a", "b"] and not first.kept and not first.revoked
        assert {pem: node for pem, (node, _) in stored_keys(database).items()} == \
            {load_site_key(keys[s]): ids[s] for s in ids}

        # The same keys again (a restart on the kept database): nothing changes.
        again = sync_site_keys(list(keys.values()), home, database)
        assert not again.registered and not again.revoked and sorted(n for _, n in again.kept) == sorted(ids.values())

        # Site b is dropped from the list: refused until the revocation is asked for, then its node is unregistered.
        b_print = fingerprint(load_site_key(keys["b"]))
        with pytest.raises(ValueError, match=re.escape(f"not given with --site-key: node {ids['b']} ({b_print})")
                           + ".*--revoke-missing"):  # a fingerprint may hold '+': escaped
            sync_site_keys([keys["a"]], home, database)
        assert {n: st for n, st in stored_keys(database).values()} == {ids["a"]: "registered", ids["b"]: "registered"}
        second = sync_site_keys([keys["a"]], home, database, revoke_missing=True)
        assert second.revoked == [(b_print, ids["b"])] and second.kept == [(str(keys["a"].resolve()), ids["a"])]
        assert {n: st for n, st in stored_keys(database).values()} == \
            {ids["a"]: "registered", ids["b"]: "unregistered"}

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
        while stored_keys(database)[load_site_key(keys["a"])][1] != "online":
            assert nodes["a"].poll() is None and time.monotonic() < deadline, \
                (tmp_path / "a.log").read_text(errors="replace")
            time.sleep(1)

        # Giving b's key back is refused with the reason (Flower never registers a key it has seen again) ...
        with pytest.raises(ValueError, match="was unregistered \\(revoked\\).* new key pair"):
            sync_site_keys(list(keys.values()), home, database)
        # ... and a key registered by hand (outside flower-server, or before a crash) is held against the list too.
        _make_keys(certs, "c")
        subprocess.run([flower_executable("flwr"), "supernode", "register", str(certs / "sites/c/c.pub"), "strpnet"],
                       env=flower_env(home), check=True, capture_output=True)
        with pytest.raises(ValueError, match="not given with --site-key: node \\d+ "):
            sync_site_keys([keys["a"]], home, database)
    finally:
        for proc in (*nodes.values(), superlink):
            stop_process(proc)


def test_a_site_revoked_while_connected_stops_with_the_reason(tmp_path: Path) -> None:
    """flower-client whose key is revoked while its SuperNode is online: Flower ends the SuperNode with code 0;
    flower-client says why and exits 1 (it exited 0, silently)."""
    from strpnet_core.console import free_port

    from deploy_helpers import console_command, write_site_cache

    _make_keys(tmp_path / "certs", "a", keys_only=False)
    tls = TLSFiles.from_dir(tmp_path / "certs")
    home, database, port = tmp_path / "flower", tmp_path / "superlink.db", free_port()
    write_flwr_config(home, f"127.0.0.1:{port}", root_certificates=tls.ca_cert)
    superlink = start_superlink(home, port=port, tls=tls, enable_supernode_auth=True, database=database)
    procs = [superlink]
    try:
        sync_site_keys([tmp_path / "certs/sites/a/a.pub"], home, database)
        cmd = console_command("flower-client", "client.supernode") + [
            "--superlink", f"127.0.0.1:{port}", "--ca", str(tls.ca_cert), "--key", str(tmp_path / "certs/sites/a/a.key"),
            "--cache-dir", str(write_site_cache(tmp_path / "cache/a", "a")), "--site-name", "a", "--skip-prepare",
            "--retry-seconds", "0"]
        log = tmp_path / "client.log"
        with open(log, "wb") as out:
            client = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=flower_env(tmp_path / "client-home"), start_new_session=True)
        procs.append(client)
        key = load_site_key(tmp_path / "certs/sites/a/a.pub")
        deadline = time.monotonic() + 120
        while stored_keys(database)[key][1] != "online":
            assert client.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(1)
        assert sync_site_keys([], home, database, revoke_missing=True).revoked
        assert client.wait(timeout=120) == 1
        assert "the coordinator has unregistered this site's key" in log.read_text(errors="replace")
    finally:
        for proc in procs[::-1]:
            stop_process(proc)
