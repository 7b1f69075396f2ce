"""Argument checks of flower-server / flower-client and the certificate script (no network)."""

from __future__ import annotations

import argparse
import stat
import subprocess
from pathlib import Path

import pytest

from client.supernode import build_parser as client_parser
from client.supernode import node_config_string, supernode_command
from server.coordinator import main as server_main
from strpnet_core.commands.simulate import parse_overrides

REPO = Path(__file__).resolve().parents[2]


def test_server_needs_certs_or_explicit_insecure(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    assert server_main(["--state-dir", str(tmp_path)]) == 1
    assert "give --certs DIR" in caplog.text
    caplog.clear()
    assert server_main(["--certs", str(tmp_path), "--site-key", "x.pub", "--state-dir", str(tmp_path)]) == 1
    assert "TLS files missing" in caplog.text


def test_server_with_auth_needs_site_keys(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    assert server_main(["--insecure", "--state-dir", str(tmp_path)]) == 1
    assert "UNENCRYPTED" in caplog.text and "--site-key" in caplog.text


def test_server_refuses_a_site_key_that_is_no_public_key(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    (tmp_path / "site.key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n")
    assert server_main(["--insecure", "--site-key", str(tmp_path / "site.key"), "--state-dir", str(tmp_path)]) == 1
    assert "site.key: not an OpenSSH public key" in caplog.text
    assert not (tmp_path / "superlink.db").exists()  # nothing was started


def test_server_refuses_bad_run_values_before_starting(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    base = ["--insecure", "--no-auth", "--state-dir", str(tmp_path)]
    assert server_main([*base, "--rounds", "0"]) == 1 and "num-server-rounds must be >= 1" in caplog.text
    assert server_main([*base, "--min-sites", "0"]) == 1 and "--min-sites 0" in caplog.text
    assert server_main([*base, "-c", "lr=-1"]) == 1 and "lr must be > 0" in caplog.text
    assert server_main([*base, "-c", "local_epochs=2"]) == 1 and "spell them with dashes" in caplog.text
    assert "(local-epochs)" in caplog.text
    assert server_main([*base, "-c", "no-such-knob=2"]) == 1 and "not used by strpnet-fed" in caplog.text
    assert not (tmp_path / "superlink.db").exists()  # nothing was started


def test_a_run_that_stopped_early_is_a_failure(tmp_path: Path) -> None:
    """flwr run --stream exits 0 whatever the run's end: success is read from the ServerApp's summary."""
    import json

    from server.launch import RunOutcome, finished_summary

    ok = RunOutcome(returncode=0, run_id=7, lines=["..."], seconds=1.0)
    summary = {"run_id": 7, "rounds_completed": 3, "num_server_rounds": 3, "stopped": None}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert finished_summary(ok, tmp_path)["rounds_completed"] == 3
    for change, reason in (({"stopped": "fewer than the quorum"}, "stopped early: fewer than the quorum"),
                           ({"rounds_completed": 2}, "2 of 3 rounds completed"),
                           ({"run_id": 6}, "no summary of run 7")):
        (tmp_path / "summary.json").write_text(json.dumps({**summary, **change}))
        with pytest.raises(RuntimeError, match=reason):
            finished_summary(ok, tmp_path)
    with pytest.raises(RuntimeError, match="flwr run exit 1"):
        finished_summary(RunOutcome(returncode=1, run_id=7, lines=[], seconds=1.0), tmp_path)


def test_supernode_command_uses_tls_key_and_node_config(tmp_path: Path) -> None:
    args = client_parser().parse_args(["--superlink", "h:9092", "--ca", "ca.crt", "--key", "a.key"])
    cmd = supernode_command(args, site_name="a b", data_dir=tmp_path / "data dir", cache_dir=tmp_path / "c", port=9999)
    assert cmd[cmd.index("--superlink") + 1] == "h:9092" and "--insecure" not in cmd
    assert cmd[cmd.index("--root-certificates") + 1].endswith("ca.crt")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1].endswith("a.key")
    assert cmd[cmd.index("--port") + 1] == "9999"
    node_config = cmd[cmd.index("--node-config") + 1]
    assert 'site-name="a b"' in node_config and f'data-dir="{tmp_path / "data dir"}"' in node_config
    assert "min-eval-patients" not in node_config and "audit-log" not in node_config  # the ClientApp's defaults
    with pytest.raises(ValueError, match="--ca"):
        supernode_command(argparse.Namespace(superlink="h:1", insecure=False, ca=None, key=None, max_wait=None),
                          site_name="a", data_dir=None, cache_dir=tmp_path, port=1)


def test_site_privacy_settings_reach_the_clientapp_through_the_node_config(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    from client.audit import audit_log_path, min_eval_patients

    args = client_parser().parse_args(["--superlink", "h:9092", "--insecure", "--min-eval-patients", "7",
                                       "--audit-log", str(tmp_path / "audit.jsonl")])
    cmd = supernode_command(args, site_name="a", data_dir=None, cache_dir=tmp_path / "c", port=9999)
    parsed = parse_config_args([cmd[cmd.index("--node-config") + 1]])  # as flower-supernode reads it
    assert min_eval_patients(parsed) == 7
    context = argparse.Namespace(node_config=parsed)
    assert audit_log_path(context) == tmp_path / "audit.jsonl"  # type: ignore[arg-type]
    bad = client_parser().parse_args(["--superlink", "h:9092", "--insecure", "--min-eval-patients", "0"])
    with pytest.raises(ValueError, match="min-eval-patients"):
        supernode_command(bad, site_name="a", data_dir=None, cache_dir=tmp_path, port=1)


def test_node_config_string_is_parsed_back_by_flower() -> None:
    from flwr.common.config import parse_config_args

    s = node_config_string({"data-dir": "/data/with space", "site-name": "h-1"})
    assert parse_config_args([s]) == {"data-dir": "/data/with space", "site-name": "h-1"}


def test_overrides_are_toml_values() -> None:
    assert parse_overrides(["lr=0.01 local-epochs=2", "preset=ci", "resume=true", 'run-dir="/a b"']) == {
        "lr": 0.01, "local-epochs": 2, "preset": "ci", "resume": True, "run-dir": "/a b"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["lr"])


def test_make_certs_san_and_keys(tmp_path: Path) -> None:
    subprocess.run([str(REPO / "deploy" / "make_certs.sh"), str(tmp_path), "--host", "fl.example.org", "--host",
                    "10.1.2.3", "--site", "h1"], check=True, capture_output=True, timeout=120)
    san = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "server.pem"), "-noout", "-ext", "subjectAltName"],
                         check=True, capture_output=True, text=True).stdout
    for name in ("DNS:localhost", "IP Address:127.0.0.1", "DNS:fl.example.org", "IP Address:10.1.2.3"):
        assert name in san
    subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "server.pem")],
                   check=True, capture_output=True)
    assert (tmp_path / "sites/h1/h1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert (tmp_path / "sites/h1/h1.key").stat().st_mode & 0o077 == 0
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_private_key((tmp_path / "sites/h1/h1.key").read_bytes(), password=None)
    assert key.curve.name == "secp384r1"  # type: ignore[union-attr]

    def make(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(REPO / "deploy" / "make_certs.sh"), str(tmp_path), *args], capture_output=True,
                              text=True, timeout=120)

    # nothing is overwritten without --force (a registered site key, the server certificate in use) ...
    files = {p: p.read_bytes() for p in (tmp_path / "sites/h1/h1.key", tmp_path / "server.pem", tmp_path / "ca.crt")}
    for args, why in ((["--site", "h1", "--keys-only"], "h1.key exists"), (["--host", "x.org"], "server.pem exists")):
        run = make(*args)
        assert run.returncode == 1 and why in run.stderr and "--force" in run.stderr
    assert all(p.read_bytes() == b for p, b in files.items())
    # ... and a CA whose key is kept offline is never replaced by a new one
    (tmp_path / "ca.key").rename(tmp_path / "offline.key")
    run = make("--force")
    assert run.returncode == 1 and "ca.key is not beside it" in run.stderr
    (tmp_path / "offline.key").rename(tmp_path / "ca.key")
    assert make("--force", "--host", "10.9.9.9").returncode == 0  # a new server certificate, the same CA
    assert (tmp_path / "ca.crt").read_bytes() == files[tmp_path / "ca.crt"]
    assert (tmp_path / "server.pem").read_bytes() != files[tmp_path / "server.pem"]
    bad = make("--days", "abc")
    assert bad.returncode == 1 and "--days abc" in bad.stderr


def test_client_needs_ca_or_explicit_insecure_which_warns(caplog: pytest.LogCaptureFixture, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import client.supernode as supernode
    from client.supernode import main as client_main

    base = ["--superlink", "127.0.0.1:1", "--site-name", "a", "--cache-dir", str(tmp_path / "cache")]
    assert client_main(base) == 1
    assert "give --ca" in caplog.text and "UNENCRYPTED" not in caplog.text
    assert not (tmp_path / "cache").exists()  # refused before any work (it came after preprocessing)
    monkeypatch.setattr(supernode, "_prepare_and_serve", lambda *a, **k: 0)
    assert client_main([*base, "--ca", str(tmp_path / "ca.crt")]) == 0
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700  # the site's cache: closed to other users
    caplog.clear()
    assert client_main(["--superlink", "127.0.0.1:1", "--data-dir", str(tmp_path / "absent"), "--insecure"]) == 1
    assert "UNENCRYPTED" in caplog.text and "no such folder" in caplog.text


def test_server_resume_checks_the_run_dir(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    import numpy as np

    from server.checkpoint import Checkpoint, save_checkpoint

    base = ["--insecure", "--no-auth", "--state-dir", str(tmp_path / "state")]
    assert server_main([*base, "--resume"]) == 1
    assert "--resume needs --run-dir" in caplog.text
    caplog.clear()
    save_checkpoint(tmp_path / "run", Checkpoint(2, {"w": np.zeros(3, dtype=np.float32)}))
    assert server_main([*base, "--run-dir", str(tmp_path / "run")]) == 1
    assert "holds a checkpoint (round 2)" in caplog.text and "--resume" in caplog.text
    assert not (tmp_path / "state").exists()  # refused before anything started


def test_client_refuses_a_flower_home_another_client_holds(caplog: pytest.LogCaptureFixture, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sites sharing a Flower home would sweep each other's SuperNode (the reaper stops every process of its
    home): the second flower-client is refused, naming the home and the holder's PID, until the holder dies."""
    import signal
    import sys
    import time
    import types

    import client.supernode as supernode
    from client.supernode import STATE_LOCK
    from client.supernode import main as client_main
    from strpnet_core import fsutil

    cache = tmp_path / "cache"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from strpnet_core.fsutil import exclusive_lock\n"
        f"with exclusive_lock({str(cache / '.flower' / STATE_LOCK)!r}, timeout_s=0, busy='x'):\n"
        "    print('held', flush=True); time.sleep(120)")], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        args = ["--superlink", "127.0.0.1:1", "--site-name", "b", "--cache-dir", str(cache), "--skip-prepare",
                "--ca", str(tmp_path / "ca.crt")]
        with monkeypatch.context() as m:  # refused at once: the lock is not waited for
            m.setattr(fsutil, "time", types.SimpleNamespace(
                monotonic=time.monotonic, sleep=lambda s: pytest.fail(f"waited {s} s for the lock")))
            assert client_main(args) == 1
        assert f"Flower home {cache / '.flower'} is in use by another flower-client" in caplog.text
        assert f"held by pid {holder.pid}" in caplog.text and "--state-dir" in caplog.text
        caplog.clear()
        # another --state-dir is not refused for the lock (it goes on to serve)
        with monkeypatch.context() as m:
            m.setattr(supernode, "_prepare_and_serve", lambda *a, **k: 7)
            assert client_main([*args, "--state-dir", str(tmp_path / "other")]) == 7
        assert "in use" not in caplog.text
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    caplog.clear()
    # the kernel released the killed holder's lock: the same home is free again
    monkeypatch.setattr(supernode, "_prepare_and_serve", lambda *a, **k: 7)
    assert client_main(args) == 7
    assert "in use" not in caplog.text


def test_a_port_in_use_is_named_before_the_superlink_starts(tmp_path: Path) -> None:
    """Another listener on the port made the SuperLink exit with code 1 and no cause shown (its web server writes
    the error to its console output, not its log); now nothing starts and the port is named."""
    import socket

    from server.launch import start_superlink

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match=rf"127\.0\.0\.1:{port} is already in use.*another --port"):
            start_superlink(tmp_path / "home", host="127.0.0.1", port=port, tls=None)
    assert not (tmp_path / "home" / "superlink.log").exists()  # nothing was started


def test_flower_log_colours_are_stripped_for_a_log_file() -> None:
    """Flower colours its level names whatever its output is; the lines `flwr_run_stream` keeps (and echoes when
    stdout is no terminal) are plain text."""
    import logging

    from flwr.supercore.logger import ConsoleHandler

    from server.launch import strip_ansi

    record = logging.LogRecord("flwr", logging.WARNING, __file__, 1, "[ROUND 2] federated C-index 0.6", None, None)
    coloured = ConsoleHandler(colored=True).format(record)
    assert "\x1b[" in coloured
    assert strip_ansi(coloured) == ConsoleHandler(colored=False).format(record) == \
        "WARNING :   [ROUND 2] federated C-index 0.6"


def test_a_resumed_run_prints_flower_round_markers_in_its_own_numbering(capsys: pytest.CaptureFixture[str]) -> None:
    from server.launch import progress_printer

    show = progress_printer(verbose=False, done_rounds=2)
    for line in ("INFO :      [ROUND 1/1]", "INFO :      [strpnet] round 3/3: federated C-index 0.5", "INFO :  noise"):
        show(line)
    assert capsys.readouterr().out.splitlines() == ["INFO :      [ROUND 3/3]",
                                                     "INFO :      [strpnet] round 3/3: federated C-index 0.5"]
    progress_printer(verbose=True)("INFO :      [ROUND 1/3]")  # a new run: as Flower prints it, every line
    assert capsys.readouterr().out == "INFO :      [ROUND 1/3]\n"
