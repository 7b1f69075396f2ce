"""``flower-server``: the coordinator of a real deployment.

Starts Flower's SuperLink with TLS (plain HTTP only with ``--insecure``, which warns) and SuperNode
authentication, keeps its state in a database, registers the sites' public keys, submits the ST-RPNet run
(``flwr run APP strpnet --stream``), streams its progress, leaves the outputs in the run directory and stops the
SuperLink it started (by PID). See docs/deployment.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from strpnet_core.console import StopRequested, raise_on_stop_signals, run_deployment_command

log = logging.getLogger("flower-server")


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``flower-server``."""
    p = argparse.ArgumentParser(
        prog="flower-server",
        description="ST-RPNet coordinator: start a Flower SuperLink (TLS + SuperNode authentication), register the "
        "sites' public keys, run federated training and write the run directory (final model, metrics, summary).",
    )
    p.add_argument("--certs", metavar="DIR", help="folder with ca.crt, server.pem, server.key (deploy/make_certs.sh)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP without TLS (testing only; prints a warning)")
    p.add_argument("--site-key", action="append", default=[], metavar="SITE.pub",
                   help="public key of a site allowed to join (repeat per site)")
    p.add_argument("--revoke-missing", action="store_true",
                   help="unregister the site keys the SuperLink's database admits that are not given with --site-key "
                   "(without it, such keys stop the start; cannot be undone: the site needs a new key pair)")
    p.add_argument("--no-auth", action="store_true",
                   help="let any SuperNode join (no node authentication; testing only; prints a warning)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the SuperLink listens on (default 127.0.0.1, behind the reverse proxy that passes "
                   "the sites' Fleet API only: docs/deployment.md, section 3; 0.0.0.0 exposes its unauthenticated "
                   "Control API to every host that reaches the port)")
    p.add_argument("--port", type=int, default=9192,
                   help="SuperLink port: Fleet, Control and runtime APIs (default 9192; the sites dial the proxy's "
                   "9092)")
    p.add_argument("--state-dir", default=str(Path.home() / ".strpnet" / "coordinator"), metavar="DIR",
                   help="SuperLink state: database, Flower home, logs (default ~/.strpnet/coordinator)")
    p.add_argument("--database", metavar="FILE", help="SuperLink database (default STATE_DIR/superlink.db)")
    p.add_argument("--run-dir", metavar="DIR", help="outputs of the run (default runs/fed-<date-time>)")
    p.add_argument("--rounds", type=int, help="num-server-rounds (default: pyproject's)")
    p.add_argument("--min-sites", type=int,
                   help="sites needed to start and in every round (default: the number of --site-key)")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR's checkpoint")
    p.add_argument("-c", "--run-config", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config key (repeatable; one -c may hold several, space-separated), e.g. "
                   "-c local-epochs=2")
    p.add_argument("--app-dir", metavar="DIR", help="the Flower app (default: this installation's source root)")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="bound on the whole run in seconds")
    p.add_argument("--verbose-flower", action="store_true", help="show Flower's full log (default: progress lines)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``flower-server``; returns the exit code."""
    return run_deployment_command(build_parser(), coordinate, argv, log)


def _sync_site_keys(keys: list[Path], flwr_home: Path, database: Path, *, revoke_missing: bool) -> dict[int, str]:
    """Register ``keys``, revoke admitted keys no longer given when asked (:func:`server.site_keys.sync_site_keys`);
    log what was done; return node id -> site name (:meth:`server.site_keys.KeySync.site_names`)."""
    from .site_keys import sync_site_keys

    done = sync_site_keys(keys, flwr_home, database, revoke_missing=revoke_missing)
    for key, node in done.registered:
        log.info("registered site key %s (node %d)", key, node)
    for key, node in done.kept:
        log.info("site key %s was already registered (node %d)", key, node)
    for key, node in done.revoked:
        log.warning("revoked site key %s (--revoke-missing): unregistered its node %d; that site can no longer "
                    "connect", key, node)
    return done.site_names()


def _write_site_names(run_dir: Path, sites: dict[int, str]) -> None:
    """``run_dir/sites.json`` (node id -> site name, which ``strpnet report`` shows in its per-site rows: the
    coordinator's own knowledge, nothing from the sites), when the run made its directory."""
    from strpnet_core.fsutil import atomic_write_json
    from strpnet_core.report import SITES_JSON

    if sites and run_dir.is_dir():
        try:
            atomic_write_json(run_dir / SITES_JSON, {"site_names": {str(n): name for n, name in sites.items()}})
        except OSError as exc:  # only labels: the run's outputs stand without them
            log.warning("could not write %s (%s): the report numbers the sites instead", run_dir / SITES_JSON, exc)


def coordinate(args: argparse.Namespace) -> int:
    """Run the coordinator described by ``args`` (see :func:`build_parser`)."""
    from strpnet_core.commands.simulate import parse_overrides
    from strpnet_core.console import stop_process

    from .launch import (
        TLSFiles,
        app_dir,
        check_resume,
        check_run_config,
        finished_summary,
        flwr_run_stream,
        progress_printer,
        refuse_if_running,
        start_superlink,
        stop_stale_runs,
        write_flwr_config,
        write_run_config,
    )
    from .site_keys import load_site_key

    if args.insecure:
        tls = None
        log.warning("--insecure: the SuperLink serves plain HTTP; weights and metrics travel UNENCRYPTED. "
                    "Use TLS (--certs) for anything but a local test.")
    else:
        if not args.certs:
            raise ValueError("give --certs DIR (ca.crt, server.pem, server.key; deploy/make_certs.sh) or --insecure")
        tls = TLSFiles.from_dir(args.certs)
    auth = not args.no_auth
    if auth and not args.site_key:
        raise ValueError("node authentication is on: give every site's public key with --site-key (or --no-auth)")
    if not auth:
        log.warning("--no-auth: any SuperNode that reaches the SuperLink can join the federation")
    keys = [Path(k) for k in args.site_key]
    for k in keys:
        if not k.is_file():
            raise FileNotFoundError(f"--site-key {k}: no such file")
        load_site_key(k)  # not a key Flower accepts: stop before anything starts
    min_sites = max(1, len(keys)) if args.min_sites is None else args.min_sites
    if min_sites < 1:
        raise ValueError(f"--min-sites {min_sites}: at least 1 site must take part")

    state = Path(args.state_dir).resolve()
    flwr_home = state / "flower"
    database = Path(args.database).resolve() if args.database else state / "superlink.db"
    if args.resume and not args.run_dir:
        raise ValueError("--resume needs --run-dir: the run directory whose checkpoint.npz is continued")
    run_dir = Path(args.run_dir or Path("runs") / time.strftime("fed-%Y%m%d-%H%M%S")).resolve()
    resumed_from = check_resume(run_dir, args.resume)
    refuse_if_running(flwr_home, "flower-server")
    connect_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    write_flwr_config(flwr_home, f"{connect_host}:{args.port}", root_certificates=None if tls is None else tls.ca_cert,
                      insecure=tls is None)
    values: dict[str, Any] = {"run-dir": str(run_dir), "resume": bool(args.resume), "min-available-nodes": min_sites,
                              "min-train-nodes": min_sites, "min-evaluate-nodes": min_sites}
    if args.rounds is not None:
        values["num-server-rounds"] = args.rounds
    values.update(parse_overrides(args.run_config))
    check_run_config(values)  # a bad value fails here, not minutes later inside the ServerApp
    config_file = write_run_config(flwr_home / "run_config.toml", values)

    kept_database = database.is_file()
    log.info("starting the SuperLink on %s:%d (%s, node authentication %s); state in %s", args.host, args.port,
             "TLS" if tls else "PLAIN HTTP", "on" if auth else "OFF", state)
    superlink = start_superlink(flwr_home, host=args.host, port=args.port, tls=tls, enable_supernode_auth=auth,
                                database=database, log_file=state / "superlink.log")
    sites: dict[int, str] = {}
    try:
        with raise_on_stop_signals() as guard:  # held while the finally block stops the SuperLink
            try:
                for run_id, fate in (stop_stale_runs(flwr_home) if kept_database else {}).items():
                    if fate == "stopped":
                        log.warning("run %d of a previous session was still open in %s: stopped it", run_id, database)
                    else:
                        log.info("run %d of a previous session is %s in %s", run_id, fate, database)
                if auth:
                    sites = _sync_site_keys(keys, flwr_home, database, revoke_missing=args.revoke_missing)
                log.info("submitting the run; waiting for %d site(s); outputs -> %s", min_sites, run_dir)
                show = progress_printer(verbose=args.verbose_flower, done_rounds=resumed_from or 0)
                outcome = flwr_run_stream(Path(args.app_dir) if args.app_dir else app_dir(), flwr_home,
                                          run_config_file=config_file, timeout_s=args.timeout, on_line=show)
            finally:
                guard.stopping()
                stop_process(superlink)
                _write_site_names(run_dir, sites)
    except StopRequested as exc:
        log.warning("signal %d: stopped the run and the SuperLink", exc.signum)
        return 128 + exc.signum  # 143 for SIGTERM, 130 for Ctrl-C, as a shell reports a process they ended
    from strpnet_core.report import format_value

    s = finished_summary(outcome, run_dir)
    print(f"run {outcome.run_id} finished: {s['rounds_completed']} rounds, final federated C-index "
          f"{format_value(s['final'].get('c_index'))}, Dice {format_value(s['final'].get('dice'))}; outputs in "
          f"{run_dir} ({outcome.seconds:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
