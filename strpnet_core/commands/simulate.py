"""``strpnet simulate``: the whole federation on one machine (Flower simulation runtime).

Steps: (1) the synthetic demo cohort is generated when no ``--data`` is given; (2) every site is validated and
preprocessed into its own cache (``RUN_DIR/cache/<site>``; reused when complete); (3) a private simulation-mode
Flower SuperLink starts on a free 127.0.0.1 port with its own ``FLWR_HOME`` (``RUN_DIR/flower``), and
``flwr run . --stream`` submits the ST-RPNet app with one simulated SuperNode per site (partition ``p`` = ``p``-th
site folder); (4) the ServerApp prints each round's federated C-index and Dice and writes ``RUN_DIR`` (final model,
metrics CSV/JSON, summary, checkpoint); (5) the SuperLink is stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from strpnet_core.presets import PRESETS

log = logging.getLogger(__name__)

DEFAULT_SITES = 3
#: Patients of the generated sites (a count per site): 14 patients keep `make demo` within 15 minutes on 2 cores of
#: the AVX-512 machine kind (12:39, 2026-12-06; not on the AVX2-only kind, docs/federation.md; 4/6/8 took 15:22 with
#: the set-up, 2026-11-25); an even count per site keeps both preprocessing workers busy.
DEFAULT_PATIENTS = "4,4,6"
DEFAULT_ROUNDS = 3
#: Held-out patients of the coordinator generated with the demo cohort (server-side evaluation, ``test-cache``).
DEFAULT_TEST_PATIENTS = 6


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``simulate`` subcommand."""
    p = subparsers.add_parser(
        "simulate",
        help="run the whole federation on this machine (Flower simulation)",
        description="Federated ST-RPNet on one machine: each site is a simulated Flower SuperNode on its own folder. "
        "Without --data the synthetic demo cohort is generated first. Prints each round's federated C-index "
        "(pooled pair counts) and Dice and leaves RUN_DIR with the final model, metrics.csv/json, summary.json "
        "and checkpoint.npz. Every other knob: -c key=value (see [tool.flwr.app.config] in pyproject.toml).",
    )
    p.add_argument("--data", metavar="DIR", help="folder of raw site folders (default: generate the demo cohort)")
    p.add_argument("--cache", metavar="DIR", help="folder of per-site caches (default RUN_DIR/cache)")
    p.add_argument("--sites", type=int, default=None,
                   help=f"number of sites (default {DEFAULT_SITES} when generating; all of --data otherwise)")
    p.add_argument("--patients", default=DEFAULT_PATIENTS,
                   help=f"patients per generated site: one count per site (default {DEFAULT_PATIENTS}), or one "
                   "number M that the sites share as M x multipliers on [0.6, 1.4] (see strpnet synth)")
    p.add_argument("--test-patients", type=int, default=DEFAULT_TEST_PATIENTS,
                   help="held-out patients of the coordinator generated with the cohort (no site has them): the "
                   "global model is evaluated on them after every round (default "
                   f"{DEFAULT_TEST_PATIENTS}; 0: none; only when the cohort is generated)")
    p.add_argument("--test-data", metavar="SITE_DIR",
                   help="a raw site folder of the coordinator's own held-out patients, evaluated after every round")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help=f"federated rounds (default {DEFAULT_ROUNDS})")
    p.add_argument("--preset", default="demo", choices=tuple(PRESETS), help="resolution preset (default demo)")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default runs/sim-<date-time>)")
    p.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes for cohort generation and preprocessing (default: one per usable CPU core; "
                   "preprocessing at most one per 2 GB of available memory)")
    p.add_argument("--cpus-per-site", type=int, default=1, help="CPUs reserved per simulated site (default 1)")
    p.add_argument("--gpus-per-site", type=float, default=None,
                   help="GPUs reserved per simulated site, a fraction shares one GPU (default: the visible CUDA GPUs "
                   "shared by all sites, min(1, GPUs / sites); 0 on a machine without CUDA)")
    p.add_argument("--resume", action="store_true",
                   help="continue the checkpoint of --out RUN_DIR after an interruption (give the same settings)")
    p.add_argument("-c", "--run-config", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config key, e.g. -c local-epochs=2 -c lr=0.0005 (repeatable; one -c may hold "
                   "several, space-separated)")
    p.add_argument("--timeout", type=float, default=6 * 3600.0, help="bound on the federated run in seconds")
    p.add_argument("--verbose-flower", action="store_true", help="show Flower's full log")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["key=value key2=value2", ...]`` with TOML values (quoted strings may hold spaces; bare words are strings)
    -> dict. Raises ValueError on an item that is not KEY=VALUE."""
    import re
    import tomllib

    pair = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")
    out: dict[str, Any] = {}
    for item in items:
        rest = pair.sub("", item).strip()
        if rest:
            raise ValueError(f"-c {item!r}: expected KEY=VALUE pairs, could not read {rest!r}")
        for key, value in pair.findall(item):
            try:
                out[key] = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                out[key] = value
    return out


def concurrent_sites(n_sites: int, cores: int, cpus_per_site: int) -> int:
    """How many simulated sites Ray runs at once on ``cores`` CPUs.

    Ray runs ``a = init-args-num-cpus / client-resources-num-cpus`` sites at a time, in waves. With
    ``s = max(1, cores // cpus_per_site)`` slots and ``a = s``, a last wave of ``n mod s`` sites (0 < n mod s < s)
    leaves cores idle while it trains (3 sites on 2 cores: the third trains alone, a wall time of 2 t for 1.5 t of
    work). Returned: ``s`` when ``n <= s`` or ``n mod s = 0``; otherwise the smallest ``a`` in ``(s, 2 s]`` whose
    last wave ``n mod a`` is 0 or ``>= s``, so that every wave keeps every core busy (wall ~ n t / s, at most 2 sites
    per slot, hence at most twice the memory of ``s`` sites); ``s`` when there is none.
    """
    slots = max(1, cores // max(1, cpus_per_site))
    if n_sites <= slots or n_sites % slots == 0:
        return slots
    for a in range(slots + 1, 2 * slots + 1):
        if n_sites % a == 0 or n_sites % a >= slots:
            return a
    return slots


def simulation_resources(n_sites: int, cpus_per_site: int, gpus_per_site: float | None,
                         visible_gpus: int, cores: int | None = None) -> dict[str, int | float]:
    """Flower's simulation ``--federation-config`` for ``n_sites`` simulated SuperNodes on this machine.

    Ray gives a site's ClientApp the GPUs of its ``client-resources-num-gpus`` (``CUDA_VISIBLE_DEVICES``; a site with
    0 sees none and trains on the CPU). Default (``gpus_per_site`` None): ``g = min(1, G / n_sites)`` for ``G``
    visible GPUs, so that all sites run at once sharing them (3 sites on 1 GPU: 1/3 each), 0 when ``G = 0``.
    ``init-args-num-gpus = G`` tells Ray how many there are. ``init-args-num-cpus`` =
    ``max(cores, a x cpus_per_site)`` with ``a`` = :func:`concurrent_sites` (``cores``: by default the CPUs this
    process may run on, ``pipeline.usable_cores``).

    Raises
    ------
    ValueError
        ``gpus_per_site`` < 0, or > 0 on a machine without a visible GPU.
    """
    if gpus_per_site is None:
        gpus_per_site = min(1.0, visible_gpus / max(n_sites, 1)) if visible_gpus > 0 else 0.0
    if gpus_per_site < 0:
        raise ValueError(f"--gpus-per-site must be >= 0, got {gpus_per_site}")
    if gpus_per_site > 0 and visible_gpus == 0:
        raise ValueError(f"--gpus-per-site {gpus_per_site}: no CUDA GPU is visible on this machine")
    if not cores:
        from ..preprocessing.pipeline import usable_cores

        cores = usable_cores()
    ray_cpus = max(cores, concurrent_sites(n_sites, cores, cpus_per_site) * int(cpus_per_site))
    out: dict[str, int | float] = {"num-supernodes": int(n_sites), "client-resources-num-cpus": int(cpus_per_site),
                                   "init-args-num-cpus": ray_cpus}
    if gpus_per_site > 0:
        out["client-resources-num-gpus"] = float(gpus_per_site)
        out["init-args-num-gpus"] = int(visible_gpus)
    return out


def simulate(
    run_dir: Path,
    *,
    data: Path | None,
    cache: Path | None = None,
    sites: int | None = None,
    patients: str = DEFAULT_PATIENTS,
    rounds: int = DEFAULT_ROUNDS,
    test_patients: int = 0,
    test_data: Path | None = None,
    preset: str = "demo",
    seed: int = 0,
    workers: int | None = None,
    cpus_per_site: int = 1,
    gpus_per_site: float | None = None,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    timeout_s: float = 6 * 3600.0,
    verbose_flower: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run a federated simulation; return the run's ``summary.json`` content.

    Parameters
    ----------
    run_dir:
        Output folder (created).
    data:
        Folder of raw site folders; None generates the synthetic cohort into ``run_dir/data``.
    cache:
        Folder of per-site caches (default ``run_dir/cache``). A cache-only site (no raw folder) works too.
    sites, patients, preset, seed:
        Cohort and preprocessing settings.
    workers:
        Processes for cohort generation (None: one per usable core) and preprocessing (None:
        ``pipeline.default_workers``, which also caps by available memory).
    rounds:
        ``num-server-rounds``.
    test_patients:
        When the cohort is generated: also generate this many held-out patients for the coordinator
        (``run_dir/test_data``, another seed; 0: none).
    test_data:
        A raw site folder of the coordinator's own held-out patients (instead of generated ones).
    Either test set is preprocessed into ``run_dir/test_cache`` and evaluated by the ServerApp after every round
    (run-config ``test-cache``): a C-index over all pairs of one set, where the sites' held-out splits give few.
    cpus_per_site, gpus_per_site:
        Flower simulation client resources (:func:`simulation_resources`; GPUs default to sharing the visible ones).
    resume:
        Continue ``run_dir``'s checkpoint.
    overrides:
        Further run-config keys.
    timeout_s:
        Bound on the Flower run.
    verbose_flower, progress:
        Output verbosity.

    Raises
    ------
    RuntimeError
        When Flower's simulation runtime (Ray) is not installed, or the Flower run fails (the log tail is in the
        message).
    """
    import importlib.util

    from client.site_data import list_sites
    from server.launch import (
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

    from ..console import free_port, stop_process
    from ..federation import prepare_site_cache
    from ..site import NoUsablePatientError

    import torch

    try:
        has_ray = importlib.util.find_spec("ray") is not None
    except ImportError:
        has_ray = False
    if not has_ray:
        raise RuntimeError("strpnet simulate needs Flower's simulation runtime (Ray), which a deployment's coordinator "
                           "and sites do without: pip install -e '.[simulation]' (make setup installs it)")
    t_start = time.monotonic()
    visible_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    simulation_resources(1, cpus_per_site, gpus_per_site, visible_gpus)  # bad GPU settings fail before the work
    if sites is not None and sites < 1:
        raise ValueError(f"--sites {sites}: at least 1 site")
    rounds = check_run_config({"num-server-rounds": rounds, "seed": seed, "preset": preset,
                               **(overrides or {})}).num_server_rounds  # so do bad -c values; -c may set the rounds
    run_dir = run_dir.resolve()
    resumed_from = check_resume(run_dir, resume)
    refuse_if_running(run_dir / "flower", "strpnet simulate")
    if resume:
        print(f"[0/3] resuming {run_dir} from " + (f"its round-{resumed_from} checkpoint" if resumed_from is not None
                                                   else "scratch (no checkpoint yet)"), flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    cache_root = (cache or run_dir / "cache").resolve()

    cache_only = data is None and cache is not None and cache_root.is_dir() and bool(list_sites(cache_root))
    if cache_only:
        print(f"[1/3] using the existing site caches in {cache_root} (no raw data)", flush=True)
        data = cache_root
    elif data is None:
        data = run_dir / "data"
        n_sites = sites or DEFAULT_SITES
        if not (data / "truth" / "cohort.json").is_file():
            from ..synth import generate_cohort

            print(f"[1/3] generating the synthetic {preset} cohort: {n_sites} sites, patients per site: {patients} "
                  f"-> {data}", flush=True)
            t0 = time.monotonic()
            cohort = generate_cohort(data, sites=n_sites, patients=patients, preset=preset, seed=seed,
                                      workers=_generation_workers(workers), progress=progress, png=False)
            print(f"      {cohort.n_patients} patients, {cohort.n_events} events, oracle C-index "
                  f"{cohort.oracle_c_index:.3f} ({time.monotonic() - t0:.0f} s)", flush=True)
        else:
            print(f"[1/3] reusing the cohort in {data}", flush=True)
        if test_patients > 0 and test_data is None:
            test_data = _generate_test_set(run_dir / "test_data", test_patients, preset=preset, seed=seed,
                                           workers=workers, progress=progress)
    data = data.resolve()
    site_dirs = list_sites(data) if data.is_dir() else []
    data_root = "" if cache_only else str(data)
    if not site_dirs:
        raise FileNotFoundError(f"no site folder under {data}")
    n_sites = min(sites or len(site_dirs), len(site_dirs))
    if n_sites < 1:
        raise ValueError("need at least one site")

    print(f"[2/3] preprocessing {n_sites} site(s) into {cache_root}", flush=True)
    for site in site_dirs[:n_sites]:
        t0 = time.monotonic()
        try:
            info = prepare_site_cache(site if data_root else None, cache_root / site.name, site_name=site.name,
                                      preset=preset, seed=seed, workers=workers, progress=progress)
        except NoUsablePatientError as exc:
            # The site stays in the federation: its ClientApp reports the same error (counts only) every round and
            # the coordinator goes on with the other sites (docs/reliability.md, section 6).
            print(f"      {site.name}: WARNING {exc}; the federation goes on without it", flush=True)
            continue
        print(f"      {site.name}: {info.num_patients} patients ready ({time.monotonic() - t0:.0f} s)", flush=True)

    test_cache = None
    if test_data is not None:
        test_cache = _prepare_test_cache(Path(test_data), run_dir / "test_cache", preset=preset, seed=seed,
                                         workers=workers, progress=progress)

    flwr_home = run_dir / "flower"
    port = free_port()
    write_flwr_config(flwr_home, f"127.0.0.1:{port}", insecure=True)
    run_values: dict[str, Any] = {
        "num-server-rounds": rounds,
        "seed": seed,
        "preset": preset,
        "data-root": data_root,
        "cache-root": str(cache_root),
        "run-dir": str(run_dir),
        "resume": resume,
        "min-train-nodes": n_sites,
        "min-evaluate-nodes": n_sites,
        "min-available-nodes": n_sites,
        "sampling-keys": True,  # new node ids every session: a fraction is sampled among the sites' keys
    }
    if test_cache is not None:
        run_values["test-cache"] = str(test_cache)
    run_values.update(overrides or {})
    config_file = write_run_config(flwr_home / "run_config.toml", run_values)
    federation = simulation_resources(n_sites, cpus_per_site, gpus_per_site, visible_gpus)

    gpus = (f", {federation['client-resources-num-gpus']:g} of {visible_gpus} CUDA GPU(s) per site"
            if "client-resources-num-gpus" in federation else ", CPU")
    print(f"[3/3] federated training: {n_sites} simulated sites, {rounds} rounds{gpus} (Flower log: {flwr_home})",
          flush=True)

    show = progress_printer(verbose=verbose_flower, done_rounds=resumed_from or 0)
    kept_database = (flwr_home / "state.db").is_file()
    superlink = start_superlink(flwr_home, host="127.0.0.1", port=port, tls=None, simulation=True,
                                database=flwr_home / "state.db")
    try:
        for run_id, fate in (stop_stale_runs(flwr_home) if kept_database else {}).items():
            print(f"      run {run_id} of the interrupted session: " + (
                "still open in its database, stopped it" if fate == "stopped" else f"{fate} (closed by the SuperLink)"),
                flush=True)
        outcome = flwr_run_stream(app_dir(), flwr_home, run_config_file=config_file, federation_config=federation,
                                  timeout_s=timeout_s, on_line=show)
    finally:
        stop_process(superlink)
    summary = finished_summary(outcome, run_dir, tail_lines=60)
    summary["simulate_wall_seconds"] = time.monotonic() - t_start
    return summary


def _generation_workers(workers: int | None) -> int:
    """Cohort-generation processes: ``workers``, or one per usable core when None."""
    from ..preprocessing.pipeline import usable_cores

    return max(1, workers) if workers else usable_cores()


def _generate_test_set(out: Path, n_patients: int, *, preset: str, seed: int, workers: int | None,
                       progress: bool) -> Path:
    """Generate (or reuse) the coordinator's held-out patients: one synthetic site with its own seed, so that no
    patient, scanner or case mix is shared with the federated sites. Returns the raw site folder."""
    from client.site_data import list_sites

    from ..federation import derive_seed
    from ..synth import generate_cohort

    if not (out / "truth" / "cohort.json").is_file():
        t0 = time.monotonic()
        cohort = generate_cohort(out, sites=1, patients=[n_patients], preset=preset,
                                 seed=derive_seed(seed, "coordinator-test"), workers=_generation_workers(workers),
                                 progress=progress, png=False)
        print(f"      coordinator test set: {cohort.n_patients} patients, {cohort.n_events} events, oracle C-index "
              f"{cohort.oracle_c_index:.3f} ({time.monotonic() - t0:.0f} s) -> {out}", flush=True)
    return list_sites(out)[0]


def _prepare_test_cache(site_dir: Path, cache_dir: Path, *, preset: str, seed: int, workers: int | None,
                        progress: bool) -> Path:
    """Validate and preprocess the coordinator's test site into ``cache_dir`` (reused when complete)."""
    from ..federation import prepare_site_cache

    t0 = time.monotonic()
    info = prepare_site_cache(site_dir, cache_dir, site_name="coordinator-test", preset=preset, seed=seed,
                              workers=workers, progress=progress)
    print(f"      coordinator test set: {info.num_patients} patients ready ({time.monotonic() - t0:.0f} s)",
          flush=True)
    return cache_dir.resolve()


def print_rounds(run_dir: Path) -> None:
    """Print the per-round table of ``run_dir/metrics.json``."""
    rows = json.loads((run_dir / "metrics.json").read_text())
    test = any("test_c_index" in r for r in rows)
    print(f"{'round':>5}  {'C-index':>7}  {'pairs':>6}  {'Dice':>6}  {'eval loss':>9}  {'train loss':>10}  {'s':>6}"
          + (f"  {'test C':>6}  {'pairs':>5}  {'test Dice':>9}" if test else ""))
    for r in rows:
        def f(key: str, spec: str) -> str:
            v = r.get(key)
            return "n/a" if v is None else format(v, spec)
        print(f"{r['round']:>5}  {f('c_index', '.3f'):>7}  {f('comparable', '.0f'):>6}  {f('dice', '.3f'):>6}  "
              f"{f('eval_loss', '.4f'):>9}  {f('train_loss', '.4f'):>10}  {f('round_seconds', '.1f'):>6}"
              + (f"  {f('test_c_index', '.3f'):>6}  {f('test_comparable', '.0f'):>5}  {f('test_dice', '.3f'):>9}"
                 if test else ""))
    if test:
        print("C-index, pairs, Dice: federated, over the sites' held-out splits (pooled counts); test: the coordinator's "
              "own held-out patients, evaluated server-side")


def run(args: argparse.Namespace) -> int:
    """Run ``strpnet simulate``; returns the exit code."""
    if args.resume and not args.out:
        log.error("--resume needs --out RUN_DIR: the run directory whose checkpoint.npz is continued")
        return 1
    run_dir = Path(args.out) if args.out else Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S")
    try:
        overrides = parse_overrides(args.run_config)
        summary = simulate(
            run_dir,
            data=Path(args.data) if args.data else None,
            cache=Path(args.cache) if args.cache else None,
            sites=args.sites,
            patients=args.patients,
            rounds=args.rounds,
            test_patients=args.test_patients,
            test_data=Path(args.test_data) if args.test_data else None,
            preset=args.preset,
            seed=args.seed,
            workers=args.workers,
            cpus_per_site=args.cpus_per_site,
            gpus_per_site=args.gpus_per_site,
            resume=args.resume,
            overrides=overrides,
            timeout_s=args.timeout,
            verbose_flower=args.verbose_flower,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as exc:
        log.error("%s", exc)
        return 1
    print()
    print_rounds(run_dir.resolve())
    print(f"\nrun directory: {summary['run_dir']} ({summary['simulate_wall_seconds']:.0f} s in all)")
    return 0
