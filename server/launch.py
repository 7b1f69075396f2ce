"""Starting Flower's own programs for a run: a SuperLink, short ``flwr`` commands, ``flwr run --stream``.

Used by ``flower-server`` (deployment: TLS + SuperNode authentication) and ``strpnet simulate`` (a private
simulation-mode SuperLink on a free 127.0.0.1 port, so that parallel simulations never share one). Every process
gets its own ``FLWR_HOME``, telemetry off and no runtime dependency installation (``strpnet_core.console.
flower_env``); every process started here is stopped by its PID (:func:`strpnet_core.console.stop_process`).
A SuperLink runs under :mod:`strpnet_core.reaper`, and every child follows its parent's death
(:func:`strpnet_core.console.die_with_parent_kwargs`): a killed coordinator or simulation leaves no Flower
process behind (SuperExec, ServerApp, simulation and Ray processes included), which a resume relies on.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strpnet_core.console import die_with_parent_kwargs, flower_env, flower_executable, stop_process
from strpnet_core.fsutil import atomic_write_text
from strpnet_core.reaper import flower_processes

#: Name of the SuperLink connection written into ``$FLWR_HOME/config.toml``.
CONNECTION = "strpnet"
_RUN_ID = re.compile(r"Successfully started run (\d+)")
#: ANSI colour and cursor sequences (Flower colours its log levels whatever its output is).
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences (``ESC [ params letter``)."""
    return _ANSI.sub("", text)


@dataclass(frozen=True)
class TLSFiles:
    """The coordinator's TLS material (``deploy/make_certs.sh`` writes it).

    Attributes
    ----------
    ca_cert:
        The CA certificate (``ca.crt``): sites and ``flwr`` verify the SuperLink with it.
    server_cert, server_key:
        The SuperLink's certificate (SAN: its host names / IPs) and private key.
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def from_dir(cls, certs_dir: str | os.PathLike[str]) -> TLSFiles:
        """``ca.crt``, ``server.pem``, ``server.key`` of a folder; FileNotFoundError naming what is missing."""
        d = Path(certs_dir)
        tls = cls(d / "ca.crt", d / "server.pem", d / "server.key")
        missing = [str(p) for p in (tls.ca_cert, tls.server_cert, tls.server_key) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"TLS files missing: {', '.join(missing)} (make them with deploy/make_certs.sh)")
        return tls


def write_flwr_config(
    flwr_home: str | os.PathLike[str],
    address: str,
    *,
    root_certificates: str | os.PathLike[str] | None = None,
    insecure: bool = False,
) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection :data:`CONNECTION` (the default).

    Parameters
    ----------
    flwr_home:
        The run's private Flower home.
    address:
        ``host:port`` of the SuperLink's HTTP API.
    root_certificates:
        CA certificate to verify the SuperLink (TLS).
    insecure:
        Plain HTTP (simulation on 127.0.0.1, or an explicit ``--insecure`` deployment).
    """
    import tomli_w

    conn: dict[str, Any] = {"address": address}
    if insecure:
        conn["insecure"] = True
    elif root_certificates is not None:
        conn["root-certificates"] = str(Path(root_certificates).resolve())
    doc = {"superlink": {"default": CONNECTION, CONNECTION: conn}}
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    atomic_write_text(path, tomli_w.dumps(doc))
    return path


def wait_superlink_ready(
    proc: subprocess.Popen[Any], url: str, *, verify: ssl.SSLContext | bool, timeout_s: float, log_file: Path | None
) -> None:
    """Poll ``url`` (the SuperLink's ``/health``) until it answers; RuntimeError with the log tail otherwise."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}{_log_tail(log_file)}")
        try:
            if httpx.get(url, timeout=1.0, verify=verify).is_success:
                return
        except httpx.HTTPError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise RuntimeError(
                    f"the SuperLink's certificate is refused at {url}: {exc}. Its SAN must name the host that "
                    f"flower-server itself dials ({url.split('/')[2].rsplit(':', 1)[0]}; deploy/make_certs.sh adds "
                    f"localhost and 127.0.0.1) and it must be signed by the --certs CA"
                ) from exc
        time.sleep(0.3)
    raise RuntimeError(f"flower-superlink not ready at {url} after {timeout_s:.0f} s{_log_tail(log_file)}")


def refuse_if_running(flwr_home: str | os.PathLike[str], what: str, *, grace_s: float = 10.0) -> None:
    """RuntimeError naming the PIDs when Flower processes of ``flwr_home`` are still alive after ``grace_s`` seconds.

    The processes of a killed session exit by themselves within about a second (:func:`strpnet_core.console.
    die_with_parent_kwargs` and Flower's parent monitors); anything alive longer would run the old run beside the
    new one (two writers of one run directory), so a new session refuses to start.
    """
    deadline = time.monotonic() + grace_s
    pids = flower_processes(flwr_home)
    while pids and time.monotonic() < deadline:
        time.sleep(0.25)
        pids = flower_processes(flwr_home)
    if pids:
        raise RuntimeError(
            f"{what}: Flower processes of a previous session still use {Path(flwr_home).resolve()} (PIDs "
            f"{', '.join(map(str, pids))}); stop them (kill PID) before starting or resuming"
        )


def _log_tail(log_file: Path | None, n: int = 25) -> str:
    """The last lines of the SuperLink's log and of its console output (``.stdout`` beside it: the web server's own
    errors, e.g. an address in use, go there)."""
    out = ""
    for path in (log_file, None if log_file is None else log_file.with_suffix(".stdout")):
        if path is not None and path.is_file() and path.stat().st_size:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]
            out += f"; last lines of {path}:\n" + "\n".join(lines)
    return out


def check_port_free(host: str, port: int) -> None:
    """RuntimeError naming ``host:port`` when something already listens there: the SuperLink would fail to bind
    (and a readiness check could even be answered by the other listener, e.g. another SuperLink of the same CA)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free for this purpose
        try:
            s.bind((host, port))
        except OSError as exc:
            raise RuntimeError(f"{host}:{port} is already in use ({exc.strerror}): another flower-server or service "
                               "listens there; choose another --port or stop it") from None


def start_superlink(
    flwr_home: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int,
    tls: TLSFiles | None,
    enable_supernode_auth: bool = False,
    simulation: bool = False,
    database: str | os.PathLike[str] | None = None,
    log_file: str | os.PathLike[str] | None = None,
    ready_timeout_s: float = 60.0,
) -> subprocess.Popen[Any]:
    """Start ``flower-superlink`` (under :mod:`strpnet_core.reaper`, in its own session) and wait until its HTTP API
    answers.

    Parameters
    ----------
    flwr_home:
        Private Flower home of this SuperLink.
    host, port:
        Where its HTTP API (Fleet + Control + runtime) listens.
    tls:
        TLS files, or None for plain HTTP (``--insecure``; simulation on 127.0.0.1 or an explicit choice).
    enable_supernode_auth:
        Only SuperNodes whose public key was registered (``flwr supernode register``) may connect.
    simulation:
        Simulation runtime (SuperNodes simulated by the run itself).
    database:
        SQLite file of the SuperLink's state (persists registered nodes and runs); None = in memory.
    log_file:
        SuperLink log file.
    ready_timeout_s:
        Bound on the start-up wait.

    Returns
    -------
    subprocess.Popen
        The supervisor of the SuperLink (stop it with ``stop_process``: the SuperLink and every process of
        ``flwr_home`` are stopped with it).

    Raises
    ------
    RuntimeError
        ``host:port`` already in use (before anything starts), or the SuperLink exited or did not answer in time
        (the tails of its log and console output in the message).
    """
    check_port_free(host, port)
    cmd = [flower_executable("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation", "--isolation", "subprocess"]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                "--ssl-keyfile", str(tls.server_key)]
    if enable_supernode_auth:
        cmd.append("--enable-supernode-auth")
    if simulation:
        cmd.append("--simulation")
    if database is not None:
        cmd += ["--database", str(database)]
    log_path = Path(log_file) if log_file is not None else Path(flwr_home) / "superlink.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd += ["--log-file", str(log_path)]
    # Under strpnet_core.reaper: stopping it (or our death) also stops Flower's detached SuperExec tree.
    cmd = [sys.executable, "-m", "strpnet_core.reaper", "--home", str(Path(flwr_home).resolve()), "--", *cmd]
    out = open(log_path.with_suffix(".stdout"), "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(cmd, env=flower_env(flwr_home), stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, **die_with_parent_kwargs())
    out.close()
    scheme = "http" if tls is None else "https"
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    verify: ssl.SSLContext | bool = False if tls is None else ssl.create_default_context(cafile=str(tls.ca_cert))
    try:
        wait_superlink_ready(proc, f"{scheme}://{connect_host}:{port}/health", verify=verify,
                             timeout_s=ready_timeout_s, log_file=log_path)
    except BaseException:
        stop_process(proc)
        raise
    return proc


def run_flwr(
    args: Sequence[str],
    flwr_home: str | os.PathLike[str],
    *,
    timeout_s: float = 120.0,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a short ``flwr`` command (``supernode register``, ``stop``, ``ls``, ...) with the run's environment."""
    return subprocess.run([flower_executable("flwr"), *args], env=flower_env(flwr_home), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout_s, check=False)


def flwr_json(args: list[str], flwr_home: str | os.PathLike[str]) -> dict[str, Any]:
    """Run ``flwr ARGS strpnet --format json``; its JSON answer (``success`` false carries ``error-message``)."""
    res = run_flwr([*args, CONNECTION, "--format", "json"], flwr_home, timeout_s=60)
    try:
        doc = json.loads(res.stdout[res.stdout.find("{"):])
    except ValueError as exc:
        raise RuntimeError(f"flwr {' '.join(args)} failed (exit {res.returncode}): "
                           f"{(res.stdout + res.stderr).strip()[-1000:]}") from exc
    if not isinstance(doc, dict):
        raise RuntimeError(f"flwr {' '.join(args)} printed {doc!r}, not a JSON object")
    return doc


#: Flower's run states (the part of ``flwr ls``'s status before ":") that a run can still leave.
OPEN_STATES = ("pending", "starting", "running")


def run_statuses(flwr_home: str | os.PathLike[str]) -> dict[int, str]:
    """Every run the SuperLink of :data:`CONNECTION` lists (``flwr ls --format json``): run id -> status, e.g.
    ``"running"`` or ``"finished:failed"``.

    Raises
    ------
    RuntimeError
        When ``flwr ls`` fails or prints something else than its JSON.
    """
    doc = flwr_json(["ls"], flwr_home)
    return {int(r["run-id"]): str(r.get("status", "")) for r in doc.get("runs", [])}


def stop_stale_runs(flwr_home: str | os.PathLike[str]) -> dict[int, str]:
    """Stop (``flwr stop``) every open run of a SuperLink that was just started on a kept database.

    A coordinator killed mid-run leaves its run "running" in the SuperLink's database, with messages the sites
    would still pull and compute although no ServerApp waits for them any more. A freshly started SuperLink has no
    live ServerApp, so every open run is stale. Whether the killed run is still open depends on timing: once its
    ServerApp's heartbeat has expired, the SuperLink itself marks it ``finished:failed``.

    Returns
    -------
    dict[int, str]
        Every run of the database -> ``"stopped"`` for those this call stopped, else the status the SuperLink gave.
    """
    fate = run_statuses(flwr_home)
    for run_id, status in sorted(fate.items()):
        if status.split(":")[0] not in OPEN_STATES:
            continue
        res = run_flwr(["stop", str(run_id), CONNECTION], flwr_home, timeout_s=60)
        if res.returncode != 0:
            raise RuntimeError(f"flwr stop {run_id} failed (exit {res.returncode}): "
                               f"{(res.stdout + res.stderr).strip()[-1000:]}")
        fate[run_id] = "stopped"
    return fate


def check_resume(run_dir: str | os.PathLike[str], resume: bool) -> int | None:
    """The round of ``run_dir``'s checkpoint (None when there is none), after checking it fits ``resume``.

    Raises
    ------
    ValueError
        When the run directory holds a checkpoint but ``resume`` is off (the ServerApp would refuse to overwrite
        it), naming the directory and the round.
    """
    from .checkpoint import CHECKPOINT_NAME, load_checkpoint

    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    ckpt = load_checkpoint(run_dir)
    done = None if ckpt is None else ckpt.server_round
    if not resume:
        raise ValueError(f"{run_dir} already holds a checkpoint (round {done}): continue it with --resume, or give "
                         f"another run directory")
    return done


def write_run_config(path: str | os.PathLike[str], values: Mapping[str, Any]) -> Path:
    """Write run-config overrides as a TOML file (passed as ``flwr run -c FILE.toml``: safe quoting of paths)."""
    import tomli_w

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nested: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    atomic_write_text(path, tomli_w.dumps(nested))
    return path


@dataclass
class RunOutcome:
    """What ``flwr run --stream`` left: exit code, Flower's run id, the streamed lines and the wall time."""

    returncode: int
    run_id: int | None
    lines: list[str]
    seconds: float


def flwr_run_stream(
    app_dir: str | os.PathLike[str],
    flwr_home: str | os.PathLike[str],
    *,
    run_config_file: str | os.PathLike[str] | None = None,
    federation_config: Mapping[str, Any] | None = None,
    timeout_s: float = 3600.0,
    on_line: Callable[[str], None] | None = None,
) -> RunOutcome:
    """Submit the app with ``flwr run APP strpnet --stream`` and follow its log until the run ends.

    Parameters
    ----------
    app_dir:
        Folder holding the app's ``pyproject.toml`` (the repository root).
    flwr_home:
        The run's Flower home (its ``config.toml`` names the SuperLink).
    run_config_file:
        TOML file of run-config overrides (:func:`write_run_config`).
    federation_config:
        Simulation only: ``num-supernodes``, ``client-resources-num-cpus``, ... (``--federation-config``).
    timeout_s:
        Bound on the whole run; on expiry the run is stopped (``flwr stop``) and TimeoutError raised.
    on_line:
        Called with every output line (default: echo to stdout); without ANSI colours unless stdout is a terminal.

    Returns
    -------
    RunOutcome
    """
    cmd = [flower_executable("flwr"), "run", str(Path(app_dir).resolve()), CONNECTION, "--stream"]
    if run_config_file is not None:
        cmd += ["-c", str(Path(run_config_file).resolve())]
    if federation_config:
        cmd += ["--federation-config", " ".join(f"{k}={_toml_value(v)}" for k, v in federation_config.items())]
    echo = on_line or (lambda line: print(line, flush=True))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=flower_env(flwr_home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, bufsize=1, cwd=str(Path(app_dir).resolve()),
                            **die_with_parent_kwargs())
    lines: list[str] = []
    run_id: list[int] = []

    def pump() -> None:
        assert proc.stdout is not None
        colours = sys.stdout.isatty()  # kept on a terminal; a log file gets plain text
        for raw in proc.stdout:
            line = strip_ansi(raw.rstrip("\n"))
            lines.append(line)
            m = _RUN_ID.search(line)
            if m and not run_id:
                run_id.append(int(m.group(1)))
            echo(raw.rstrip("\n") if colours else line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        if run_id:
            run_flwr(["stop", str(run_id[0]), CONNECTION], flwr_home, timeout_s=60)
        stop_process(proc)
        raise TimeoutError(f"flwr run did not finish within {timeout_s:.0f} s") from None
    except BaseException:
        if run_id:
            run_flwr(["stop", str(run_id[0]), CONNECTION], flwr_home, timeout_s=60)
        stop_process(proc)
        raise
    reader.join(timeout=10)
    return RunOutcome(proc.returncode, run_id[0] if run_id else None, lines, time.monotonic() - t0)


#: Lines of ``flwr run --stream`` a console shows without ``--verbose-flower``: ours, Flower's round markers, errors.
SHOWN_LINES: tuple[str, ...] = ("[strpnet]", "[ROUND", "ERROR", "Error", "Traceback", "Successfully started run",
                                "failures")
_FLOWER_ROUND = re.compile(r"\[ROUND (\d+)/(\d+)\]")


def progress_printer(*, verbose: bool, done_rounds: int = 0) -> Callable[[str], None]:
    """``on_line`` of :func:`flwr_run_stream` for a console: every line when ``verbose``, else :data:`SHOWN_LINES`.

    A resumed run continues after ``done_rounds`` rounds, but Flower numbers its rounds from 1: its marker
    ``[ROUND k/m]`` is printed as ``[ROUND k+done/m+done]``, the run's own numbering (as in the ``[strpnet]`` lines).
    """

    def show(line: str) -> None:
        if verbose or any(s in line for s in SHOWN_LINES):
            if done_rounds:
                line = _FLOWER_ROUND.sub(lambda m: f"[ROUND {int(m[1]) + done_rounds}/{int(m[2]) + done_rounds}]",
                                         line)
            print(line, flush=True)

    return show


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def app_dir() -> Path:
    """The Flower app folder (repository root with ``pyproject.toml``) of this installation.

    Raises
    ------
    FileNotFoundError
        For a non-editable install, where the app's sources and ``pyproject.toml`` are not together on disk.
    """
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file() or not (root / "client" / "app.py").is_file():
        raise FileNotFoundError(
            f"no pyproject.toml beside the installed packages ({root}): run from a source checkout installed with "
            f"`pip install -e .` (or pass --app-dir)"
        )
    return root


def python_executable() -> str:
    """The running Python (virtual environment)."""
    return sys.executable


def finished_summary(outcome: RunOutcome, run_dir: str | os.PathLike[str], *, tail_lines: int = 40) -> dict[str, Any]:
    """The run directory's ``summary.json`` of a run that completed every round, else RuntimeError.

    ``flwr run --stream`` exits 0 whatever the run's end (Flower 1.42 does not check its final status), so success
    is read from the ServerApp's own summary: the same run id, no ``stopped`` reason (e.g. fewer sites than the
    quorum) and ``rounds_completed == num_server_rounds``.
    """
    import json

    path = Path(run_dir) / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    why = None
    if outcome.returncode != 0:
        why = f"flwr run exit {outcome.returncode}"
    elif summary.get("run_id") != outcome.run_id:
        why = f"no summary of run {outcome.run_id} in {path}"
    elif summary.get("stopped"):
        why = f"stopped early: {summary['stopped']}"
    elif summary.get("rounds_completed") != summary.get("num_server_rounds"):
        why = f"{summary.get('rounds_completed')} of {summary.get('num_server_rounds')} rounds completed"
    if why is not None:
        tail = "\n".join(outcome.lines[-tail_lines:])
        raise RuntimeError(f"the federated run failed ({why}); outputs of the completed rounds, if any, in {run_dir}; "
                           f"last lines:\n{tail}")
    return summary


def check_run_config(values: Mapping[str, Any]) -> Any:
    """The :class:`~strpnet_core.federation.FederationConfig` of ``values`` (the run config keys a launcher sets or
    overrides, the rest at their defaults), with its model and training configurations built: a bad key or value
    raises ValueError naming it before anything starts.  Keys are spelt as in ``[tool.flwr.app.config]``, with
    dashes: Flower refuses ``local_epochs`` ("Invalid run configuration") although the Python API accepts it."""
    from strpnet_core.federation import FederationConfig

    underscored = sorted(k for k in values if "_" in k)
    if underscored:
        raise ValueError(f"run config key(s) {', '.join(underscored)}: spell them with dashes, as in "
                         f"[tool.flwr.app.config] ({', '.join(k.replace('_', '-') for k in underscored)})")
    cfg = FederationConfig.from_run_config(dict(values))
    cfg.model_config()
    cfg.train_config()
    return cfg
