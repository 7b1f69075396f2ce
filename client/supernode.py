"""``flower-client``: a hospital site of a real deployment.

Checks and preprocesses the site's data into its cache (at every start: new and changed patients preprocessed,
finished ones skipped), then runs Flower's SuperNode
(``flower-supernode``) with the federation's CA certificate, the site's private key (node authentication) and
the node config that the ClientApp reads: ``data-dir``, ``cache-dir``, ``site-name`` and, when given, the site's own
privacy settings ``min-eval-patients`` (small-count rule) and ``audit-log`` (``client/audit.py``). Stops the
SuperNode (by PID) on Ctrl-C / SIGTERM. See docs/deployment.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from strpnet_core.console import die_with_parent_kwargs, run_deployment_command
from strpnet_core.fsutil import exclusive_lock, private_dir
from strpnet_core.presets import PRESETS

log = logging.getLogger("flower-client")

_RETRY_DELAY_S = 10.0
#: Lock file in a SuperNode's Flower home, held by its flower-client for as long as it runs.
STATE_LOCK = "flower-client.lock"
#: A SuperNode that ran this long before exiting counts as having joined (the retry window starts again).
_JOINED_AFTER_S = 60.0


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``flower-client``."""
    p = argparse.ArgumentParser(
        prog="flower-client",
        description="ST-RPNet site: validate and preprocess the local data (cached), then connect to the "
        "coordinator as a Flower SuperNode and train/evaluate locally. Only weights and aggregate counts leave.",
    )
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the coordinator's SuperLink")
    p.add_argument("--data-dir", metavar="DIR", help="the site's raw folder (docs/data-format.md)")
    p.add_argument("--cache-dir", metavar="DIR", help="preprocessed cache (default ~/.cache/strpnet/SITE)")
    p.add_argument("--site-name", help="name of the site (default: the data folder's name)")
    p.add_argument("--ca", metavar="ca.crt", help="the federation's CA certificate (TLS)")
    p.add_argument("--key", metavar="SITE.key", help="the site's private key (node authentication)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (testing only; prints a warning)")
    p.add_argument("--preset", default="demo", choices=tuple(PRESETS),
                   help="preprocessing grid; must match the run's preset (default demo)")
    p.add_argument("--seed", type=int, default=0, help="preprocessing seed (default 0)")
    p.add_argument("--workers", type=int, default=None,
                   help="patients preprocessed in parallel (default: one per core, at most one per 2 GB of available "
                   "memory)")
    p.add_argument("--port", type=int, default=0,
                   help="local port of this SuperNode's runtime API; unique per SuperNode on one host "
                   "(default: a free one)")
    p.add_argument("--state-dir", metavar="DIR", help="Flower home of this SuperNode (default CACHE_DIR/.flower)")
    p.add_argument("--max-wait", type=float, default=None,
                   help="give up when the SuperLink cannot be reached for this many seconds (default: keep trying)")
    p.add_argument("--retry-seconds", type=float, default=600.0,
                   help="restart a SuperNode that fails to join (e.g. the coordinator has not registered this site's "
                   "key yet, or --max-wait expired while the coordinator restarts) for this long after the last "
                   "outage began (default 600; 0 = never)")
    p.add_argument("--min-eval-patients", type=int, default=None, metavar="K",
                   help="small-count rule of this site: an evaluation split of fewer than K patients sends zero "
                   "counts, and fewer than K with a recurrence mask zero loss/Dice sums (default 2; small-cell rules "
                   "in health statistics commonly use 5 to 11). The coordinator cannot change it")
    p.add_argument("--audit-log", metavar="FILE",
                   help="append one JSON line per reply this site sends (key names, shapes, the aggregates sent) to "
                   "this local file")
    p.add_argument("--skip-prepare", action="store_true", help="do not check/preprocess the data before starting")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``flower-client``; returns the SuperNode's exit code."""
    return run_deployment_command(build_parser(), run_site, argv, log)


def node_config_string(values: dict[str, str | int]) -> str:
    """``key="value" ...`` for ``flower-supernode --node-config`` (TOML strings)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def supernode_command(args: argparse.Namespace, *, site_name: str, data_dir: Path | None, cache_dir: Path,
                      port: int) -> list[str]:
    """The ``flower-supernode`` command line of this site."""
    from strpnet_core.console import flower_executable

    cmd = [flower_executable("flower-supernode"), "--superlink", args.superlink, "--isolation", "subprocess",
           "--host", "127.0.0.1", "--port", str(port)]
    if args.insecure:
        cmd.append("--insecure")
    else:
        if not args.ca:
            raise ValueError("give --ca ca.crt (the federation's CA) or --insecure")
        cmd += ["--root-certificates", str(Path(args.ca).resolve())]
    if args.key:
        cmd += ["--auth-supernode-private-key", str(Path(args.key).resolve())]
    if args.max_wait is not None:
        cmd += ["--max-wait-time", str(args.max_wait)]
    cmd += ["--node-config", node_config_string(node_config(args, site_name=site_name, data_dir=data_dir,
                                                            cache_dir=cache_dir))]
    return cmd


def node_config(args: argparse.Namespace, *, site_name: str, data_dir: Path | None,
                cache_dir: Path) -> dict[str, str | int]:
    """The SuperNode's node config: ``site-name``, ``cache-dir``, ``data-dir`` and the site's privacy settings.

    Raises
    ------
    ValueError
        ``--min-eval-patients`` below 1.
    """
    from .audit import AUDIT_LOG_NODE_KEY, MIN_EVAL_PATIENTS_NODE_KEY, min_eval_patients

    cfg: dict[str, str | int] = {"site-name": site_name, "cache-dir": str(cache_dir)}
    if data_dir is not None:
        cfg["data-dir"] = str(data_dir)
    if getattr(args, "min_eval_patients", None) is not None:
        cfg[MIN_EVAL_PATIENTS_NODE_KEY] = min_eval_patients({MIN_EVAL_PATIENTS_NODE_KEY: args.min_eval_patients})
    if getattr(args, "audit_log", None):
        cfg[AUDIT_LOG_NODE_KEY] = str(Path(args.audit_log).expanduser().resolve())
    return cfg


def run_site(args: argparse.Namespace) -> int:
    """Prepare the site's cache, then run the SuperNode until it exits (or we are stopped)."""
    if args.insecure:
        log.warning("--insecure: this site talks plain HTTP; weights travel UNENCRYPTED (testing only)")
    if not args.key:
        log.warning("no --key: the coordinator will refuse this site if it enforces node authentication")
    data_dir = Path(args.data_dir).resolve() if args.data_dir else None
    if data_dir is not None and not data_dir.is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir}: no such folder")
    site_name = args.site_name or (data_dir.name if data_dir else None)
    if not site_name:
        raise ValueError("give --site-name or --data-dir")
    cache_dir = Path(args.cache_dir).resolve() if args.cache_dir else Path.home() / ".cache" / "strpnet" / site_name
    # bad values (the node config, a missing --ca) fail before the work, not after preprocessing
    supernode_command(args, site_name=site_name, data_dir=data_dir, cache_dir=cache_dir, port=1)
    state = Path(args.state_dir).resolve() if args.state_dir else cache_dir / ".flower"
    open_to_others = private_dir(cache_dir)  # before the lock creates it: closed to other users
    if open_to_others and args.skip_prepare:  # else preprocessing says it
        log.warning("%s", open_to_others)
    # One flower-client per Flower home: a second one would share FLWR_HOME, and the reaper of whichever SuperNode
    # exits first stops every process of that home, the other site's SuperNode included.
    with exclusive_lock(state / STATE_LOCK, timeout_s=0.0,
                        busy=f"Flower home {state} is in use by another flower-client; give each site its own "
                        "--state-dir (default CACHE_DIR/.flower, so also its own --cache-dir)"):
        return _prepare_and_serve(args, site_name=site_name, data_dir=data_dir, cache_dir=cache_dir, state=state)


def _prepare_and_serve(args: argparse.Namespace, *, site_name: str, data_dir: Path | None, cache_dir: Path,
                       state: Path) -> int:
    """Prepare the cache (unless ``--skip-prepare``), then run the SuperNode with Flower home ``state``, restarting
    it while it fails to join for ``--retry-seconds``; returns its exit code."""
    from strpnet_core.dataset import PatientDataset
    from strpnet_core.console import flower_env, free_port, stop_process
    from strpnet_core.federation import prepare_site_cache

    if not args.skip_prepare:
        t0 = time.monotonic()
        info = prepare_site_cache(data_dir, cache_dir, site_name=site_name, preset=args.preset, seed=args.seed,
                                  workers=args.workers, progress=sys.stderr.isatty(), refresh=True)
        log.info("site %s: %d patient(s) ready in %s (%.0f s)", site_name, info.num_patients, cache_dir,
                 time.monotonic() - t0)
        # A site folder without outcomes.csv preprocesses (for inference) but cannot train: say so before joining.
        PatientDataset(cache_dir, require_outcome=True)
    port = args.port or free_port()
    cmd = supernode_command(args, site_name=site_name, data_dir=data_dir, cache_dir=cache_dir, port=port)
    stopping: list[int] = []
    current: list[subprocess.Popen[bytes]] = []

    def stop(signum: int, _frame: object) -> None:
        # Only signal here: the main thread is inside proc.wait(), whose lock a wait in this handler could not take
        # (stop_process then sat out its timeouts, ~30 s, before the exit); the main loop reaps and cleans up.
        stopping.append(signum)
        for proc in current:
            log.info("signal %d: stopping the SuperNode (pid %d)", signum, proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    give_up = time.monotonic() + max(0.0, args.retry_seconds)
    attempt, rc = 0, 0
    while not stopping:
        attempt += 1
        log.info("starting the SuperNode of %s -> %s (attempt %d)", site_name, args.superlink, attempt)
        # Under strpnet_core.reaper: the SuperNode and its ClientApp processes stop with us, however we stop.
        proc = subprocess.Popen([sys.executable, "-m", "strpnet_core.reaper", "--home", str(state), "--", *cmd],
                                env=flower_env(state), **die_with_parent_kwargs())
        current[:] = [proc]
        t_start = time.monotonic()
        try:
            if not stopping:  # a signal that came before `current` held proc found nothing to stop
                rc = proc.wait()
        finally:
            stop_process(proc)
        if stopping:
            return 128 + stopping[0]  # a requested stop: the shell's code of a process ended by that signal
        if rc == 0:  # a SuperNode ends by itself only when the SuperLink ends its node
            log.error("the SuperNode ended by itself (code 0): the coordinator has unregistered this site's key "
                      "(flower-server --revoke-missing), so it cannot rejoin with it; ask the coordinator")
            return 1
        if time.monotonic() - t_start > _JOINED_AFTER_S:  # it had been up: a new outage gets a full retry window
            give_up = time.monotonic() + max(0.0, args.retry_seconds)
        if time.monotonic() + _RETRY_DELAY_S > give_up:
            log.error("the SuperNode exited with code %d; giving up (is this site's key registered at the "
                      "coordinator? are --ca and --superlink right?)", rc)
            return rc
        log.warning("the SuperNode exited with code %d (not yet registered at the coordinator? a TLS error above: "
                    "check --ca and the name in --superlink); retrying in %.0f s", rc, _RETRY_DELAY_S)
        retry_at = time.monotonic() + _RETRY_DELAY_S
        while not stopping and time.monotonic() < retry_at:  # a signal now ends the wait, not a new SuperNode
            time.sleep(0.2)
    return 128 + stopping[0]


if __name__ == "__main__":
    sys.exit(main())
