"""Federation benchmark: prints tables (never asserts timings).

1. Per round: the slowest site's local training time vs the round's wall time (Flower + evaluation overhead).
2. Bytes per round per site vs the model size (ArrayRecord payloads: the global model down for train and evaluate,
   the site's model up after training; metric records are a few hundred bytes).
3. Simulation with 2 / 4 / 8 sites: wall time and peak resident memory of the whole process tree (SuperLink,
   ServerApp, Ray workers).

Sites are tiny caches written directly (no synth/preprocessing), so the numbers measure the federation itself.

    .venv/bin/python benchmarks/bench_federation.py [--sites 2,4,8] [--rounds 2] [--patients 4] [--size 16]

``--mode deploy``: the real deployment on 127.0.0.1 (issue 5: "per round, slowest site compute vs round wall time,
overhead target <= 10% at the demo preset in deployment"). Writes site caches directly at the demo grid (96^3,
T=3 timepoints, 4 modalities, float16 like the preprocessing's), makes certificates and site keys with
deploy/make_certs.sh, starts ``flower-server`` (TLS + SuperNode authentication, its own state dir and FLWR_HOME) and
one ``flower-client`` per site, each a separate process, with the DEFAULT model and ``--local-epochs`` (default 1),
then reads RUN_DIR/metrics.json. Per round it prints the round's wall time (``round_seconds``), the slowest site's
compute time of its train message (``train_seconds_max``, from the sites' ``train-seconds``) and of its evaluate message
(``eval_seconds_max``, from ``eval-seconds``: the forward passes over the held-out split, and over the training split
for the risk reference in the last round), and

    overhead = (round wall - slowest train compute - slowest evaluate compute) / round wall

i.e. what Flower adds (messages, serialisation, a fresh ``flwr-clientapp`` process per message, the SuperNodes'
polling, aggregation, checkpoint) as a share of the round. Round 1 includes the start-up of the SuperNodes
(they start once the coordinator has registered their keys) and is reported apart from the mean of later rounds.
A second table splits each round with the sites' own logs (time-stamped as they are read): the slowest site's
handling of its train and of its evaluate message (SuperNode "Receiving" -> "Sending") and the rest of the round.

    nice -n 5 .venv/bin/python benchmarks/bench_federation.py --mode deploy [--sites 2] [--patients 3] \
        [--local-epochs 1] [--rounds 3] [--size 96] [--timepoints 3] [--threads 1] [--timeout 3600]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from strpnet_core.cache import CachedPatient, cache_path, save_cached_patient  # noqa: E402
from strpnet_core.commands.simulate import simulate  # noqa: E402
from server.launch import strip_ansi  # noqa: E402


def write_caches(root: Path, sites: int, patients: int, size: int, seed: int = 0, *, timepoints: int = 2,
                 preset: str = "ci", dtype: str = "float32") -> Path:
    """``root/site-0k/*.npz``: random patients (``timepoints`` scans of 4 modalities, size^3, ``dtype``)."""
    rng = np.random.default_rng(seed)
    lo, hi = 2 * size // 16, 7 * size // 16  # the recurrence blob (2:7 at 16^3)
    days = (90.0 * np.arange(timepoints)).astype(np.float32)
    labels = [f"{t:03d}" for t in range(timepoints)]
    for s in range(sites):
        site = f"site-{s + 1:02d}"
        for i in range(patients):
            blob = np.zeros((size,) * 3, dtype=np.uint8)
            blob[lo:hi, lo:hi, lo:hi] = 1
            images = rng.normal(0, 0.3, (timepoints, 4, size, size, size)).astype(dtype)
            event = int(rng.random() < 0.7)
            p = CachedPatient(patient_id=f"{site}-{i:03d}", site=site, images=images,
                              days=days.copy(), timepoints=list(labels),
                              brain_mask=np.ones((size,) * 3, dtype=np.uint8), recurrence=blob if event else None,
                              event=event, time=float(rng.integers(60, 900)), meta={"preset": preset})
            save_cached_patient(cache_path(root / site, p.patient_id), p)
    return root


def _tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of ``root_pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as fh:
                rss[int(entry)] = int(fh.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


class PeakMemory:
    """Samples the process tree's RSS every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_bytes(os.getpid()))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


REPO = Path(__file__).resolve().parents[1]


def _start_logged(cmd: list[str], log: Path, env: dict[str, str], t0: float,
                  readers: list[threading.Thread]) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in the repository in its own session (so that stop_process stops its whole group); a thread
    copies its output to ``log`` (created here, so that a reader may poll it at once), each line prefixed with the
    seconds since ``t0`` (Flower's lines carry no time)."""
    log.touch()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            cwd=REPO, start_new_session=True)

    def copy() -> None:
        assert proc.stdout is not None
        with open(log, "a", encoding="utf-8", errors="replace") as fh:
            for raw in proc.stdout:  # until every process holding the pipe (children included) has exited
                fh.write(f"{time.monotonic() - t0:10.3f} {raw.decode('utf-8', 'replace')}")
                fh.flush()

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    readers.append(thread)
    return proc


def _timed_lines(log: Path) -> list[tuple[float, str]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        t, _, rest = line.lstrip().partition(" ")
        try:
            out.append((float(t), strip_ansi(rest)))
        except ValueError:
            continue
    return out


def phase_times(logs: Path, sites: list[str]) -> dict[int, dict[str, float]]:
    """Per round, from the sites' time-stamped logs: the slowest site's handling of its train / evaluate message
    (SuperNode "Receiving" -> "Sending": pulling it, a fresh flwr-clientapp process, loading the cache and the model,
    the work, the reply). (The coordinator's lines reach its log through ``flwr run --stream``, in batches, so they
    are not timed.) The k-th train / evaluate message of a site belongs to round k."""
    rounds: dict[int, dict[str, float]] = {}
    for s in sites:
        start: dict[str, float] = {}
        count = {"train": 0, "evaluate": 0}
        for t, line in _timed_lines(logs / f"{s}.log"):
            if m := re.search(r"(Receiving|Sending): (train|evaluate) message", line):
                kind = m.group(2)
                if m.group(1) == "Receiving":
                    start[kind] = t
                elif kind in start:
                    count[kind] += 1
                    row = rounds.setdefault(count[kind], {})
                    row[f"site_{kind}"] = max(row.get(f"site_{kind}", 0.0), t - start.pop(kind))
    return rounds


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"({path}: unreadable)"


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_deployment(args: argparse.Namespace, base: Path) -> tuple[list[dict], dict[str, float]]:
    """The real deployment on 127.0.0.1: ``flower-server`` (TLS + SuperNode authentication) and one ``flower-client``
    per site, each a separate process started here and stopped by its PID (process group). Returns the rows of
    RUN_DIR/metrics.json and a few timings."""
    import signal

    from strpnet_core.console import flower_env, flower_executable, free_port, stop_process

    n = int(args.sites)
    names = [f"site-{s + 1:02d}" for s in range(n)]
    logs = base / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    caches = write_caches(base / "caches", n, args.patients, args.size, timepoints=args.timepoints, preset="demo",
                          dtype="float16")
    certs = base / "certs"
    subprocess.run([str(REPO / "deploy" / "make_certs.sh"), str(certs), *(a for s in names for a in ("--site", s))],
                   check=True, capture_output=True, timeout=180)
    setup_s = time.monotonic() - t0
    port = free_port()
    env = flower_env(base / "flwr-home")
    run_dir = base / "run"
    server_cmd = [flower_executable("flower-server"), "--certs", str(certs),
                  *(a for s in names for a in ("--site-key", str(certs / "sites" / s / f"{s}.pub"))),
                  "--host", "127.0.0.1", "--port", str(port), "--state-dir", str(base / "coordinator"),
                  "--run-dir", str(run_dir), "--rounds", str(args.rounds), "--timeout", str(args.timeout),
                  "--app-dir", str(REPO), "-c", "preset=demo", "-c", f"local-epochs={args.local_epochs}",
                  "-c", f"num-threads={args.threads}", *(a for kv in args.run_config for a in ("-c", kv))]
    client = flower_executable("flower-client")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    readers: list[threading.Thread] = []
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    t_server = time.monotonic()
    try:
        procs["server"] = _start_logged(server_cmd, logs / "server.log", env, t_server, readers)
        deadline = time.monotonic() + 180
        # The site keys are registered from "submitting the run" on; a site started earlier would be refused (305).
        while "submitting the run" not in (logs / "server.log").read_text(errors="replace"):
            if procs["server"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"flower-server did not reach 'submitting the run' (exit {procs['server'].poll()}):"
                                   f"\n{_tail(logs / 'server.log')}")
            time.sleep(0.5)
        for s in names:
            procs[s] = _start_logged([client, "--superlink", f"127.0.0.1:{port}", "--cache-dir", str(caches / s),
                                      "--site-name", s, "--ca", str(certs / "ca.crt"),
                                      "--key", str(certs / "sites" / s / f"{s}.key"), "--preset", "demo"],
                                     logs / f"{s}.log", env, t_server, readers)
        try:
            rc = procs["server"].wait(timeout=args.timeout + 120)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"flower-server still running after {args.timeout + 120:.0f} s; stopped it:\n"
                               f"{_tail(logs / 'server.log')}") from None
        if rc != 0:
            raise RuntimeError(f"flower-server exited with code {rc}:\n{_tail(logs / 'server.log')}\n"
                               + "\n".join(f"--- {s}:\n{_tail(logs / f'{s}.log', 15)}" for s in names))
    finally:
        for proc in procs.values():
            stop_process(proc)
        for thread in readers:
            thread.join(timeout=30)
        signal.signal(signal.SIGTERM, previous)
    deploy_s = time.monotonic() - t_server
    rows = json.loads((run_dir / "metrics.json").read_text())
    phases = phase_times(logs, names)
    for r in rows:
        r["phases"] = phases.get(int(r["round"]), {})
    return rows, {"setup_s": setup_s, "deploy_s": deploy_s}


def _count(v: object) -> str:
    return f"{v:.0f}" if isinstance(v, (int, float)) else "?"


def _compute(row: dict, step: str) -> float:
    """The slowest site's compute seconds of ``step`` ("train" or "eval") in a metrics row (0 when absent)."""
    return float(row.get(f"{step}_seconds_max") or 0.0)


def print_deployment(args: argparse.Namespace, rows: list[dict], times: dict[str, float],
                     load_before: tuple[float, ...], load_after: tuple[float, ...], base: Path) -> None:
    """The tables of ``--mode deploy``: round wall vs the slowest sites' compute (never asserted)."""
    mb = rows[0].get("model_bytes", 0) if rows else 0
    print(f"\ndeployment on 127.0.0.1 (flower-server TLS + SuperNode authentication, {args.sites} flower-client "
          f"sites x {args.patients} patients, {args.size}^3 x {args.timepoints} timepoints x 4 modalities, "
          f"{'model' if any(kv.startswith('model.') for kv in args.run_config) else 'default model'} "
          f"{mb / 1e6:.2f} MB, {args.local_epochs} local epoch(s), num-threads={args.threads}, {len(rows)} rounds)")
    print("overhead = (round wall - slowest site's train compute - slowest site's evaluate compute) / round wall\n")
    print(f"{'round':>5} {'round wall s':>12} {'slowest train s':>15} {'slowest eval s':>14} {'overhead s':>10} "
          f"{'overhead':>8} {'sites t/e':>9}")
    for r in rows:
        wall, slow, ev = float(r["round_seconds"]), _compute(r, "train"), _compute(r, "eval")
        print(f"{r['round']:>5} {wall:>12.1f} {slow:>15.1f} {ev:>14.1f} {wall - slow - ev:>10.1f} "
              f"{(wall - slow - ev) / wall:>8.1%} {_count(r.get('train_sites')):>4}/{_count(r.get('eval_sites')):<4}")

    print("\nwhere the round goes (s; site columns: the slowest site's SuperNode from receiving the message to "
          "sending the reply, from its time-stamped log:\na fresh flwr-clientapp process, loading cache and model, "
          "the work; rest = round wall - both, approximate: messaging, polling, aggregation, checkpoint)")
    print(f"{'round':>5} {'round wall':>10} {'site train msg':>14} {'train-seconds':>13} {'site eval msg':>13} "
          f"{'eval-seconds':>12} {'rest':>6}")
    na = float("nan")
    for r in rows:
        ph = r.get("phases", {})
        wall, st, se = float(r["round_seconds"]), ph.get("site_train", na), ph.get("site_evaluate", na)
        print(f"{r['round']:>5} {wall:>10.1f} {st:>14.1f} {_compute(r, 'train'):>13.1f} {se:>13.1f} "
              f"{_compute(r, 'eval'):>12.1f} {wall - st - se:>6.1f}")

    def summary(label: str, sel: list[dict]) -> None:
        if not sel:
            print(f"{label}: none")
            return
        wall = sum(float(r["round_seconds"]) for r in sel)
        compute = sum(_compute(r, "train") + _compute(r, "eval") for r in sel)
        ov = (wall - compute) / wall
        print(f"{label}: round wall {wall / len(sel):.1f} s, slowest sites' compute {compute / len(sel):.1f} s, "
              f"overhead {ov:.1%} -> target <= 10%: {'met' if ov <= 0.10 else 'NOT met'}")

    print()
    summary("round 1 (includes the SuperNodes' start-up)", rows[:1])
    summary(f"rounds 2-{len(rows)} (mean; overhead = sum of (wall - compute) / sum of wall)", rows[1:])
    print(f"\nset-up (caches + certificates) {times['setup_s']:.0f} s; flower-server start to exit "
          f"{times['deploy_s']:.0f} s")
    print("load average (1/5/15 min) before: " + " ".join(f"{x:.2f}" for x in load_before)
          + "; after: " + " ".join(f"{x:.2f}" for x in load_after) + f" ({os.cpu_count()} CPUs)")
    print(f"\nrun directory, logs, certificates in {base}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("simulate", "deploy"), default="simulate",
                    help="simulate (default): strpnet simulate with 2/4/8 tiny sites; deploy: flower-server + "
                    "flower-client processes on 127.0.0.1 at the demo grid")
    ap.add_argument("--sites", help="simulate: comma-separated site counts (default 2,4,8); deploy: sites (default 2)")
    ap.add_argument("--rounds", type=int, help="rounds (default 2; deploy 3)")
    ap.add_argument("--patients", type=int, help="patients per site (default 4; deploy 3)")
    ap.add_argument("--size", type=int, help="grid edge of the caches (default 16; deploy 96, the demo grid)")
    ap.add_argument("--timepoints", type=int, help="scans per patient (default 2; deploy 3)")
    ap.add_argument("--gpus-per-site", type=float, default=None,
                    help="simulate: GPUs per simulated site (default: the visible CUDA GPUs shared by all sites; "
                    "1: one site per GPU at a time; 0: CPU)")
    ap.add_argument("--local-epochs", type=int, default=1, help="deploy: local epochs per round (default 1)")
    ap.add_argument("--threads", type=int, default=1,
                    help="deploy: torch threads per site (run config num-threads; default 1: the sites share this "
                    "machine's cores)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="deploy: bound on the run in seconds (default 3600)")
    ap.add_argument("-c", "--run-config", action="append", default=[], help="run-config override KEY=VALUE")
    ap.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args(argv)
    deploy = args.mode == "deploy"
    for key, sim_default, deploy_default in (("sites", "2,4,8", "2"), ("rounds", 2, 3), ("patients", 4, 3),
                                             ("size", 16, 96), ("timepoints", 2, 3)):
        if getattr(args, key) is None:
            setattr(args, key, deploy_default if deploy else sim_default)
    if deploy:
        if not str(args.sites).isdigit() or int(args.sites) < 1:
            ap.error("--mode deploy: --sites is one number of sites")
        base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-federation-deploy-"))
        base.mkdir(parents=True, exist_ok=True)
        load_before = os.getloadavg()
        rows, times = run_deployment(args, base)
        load_after = os.getloadavg()
        print_deployment(args, rows, times, load_before, load_after, base)
        return 0
    from strpnet_core.commands.simulate import parse_overrides

    # fp32 unless -c says otherwise: at the default 16^3 the default model's bottleneck is 2^3 voxels, where CPU bf16
    # autocast (oneDNN, AVX512-BF16 CPUs) gave gradients that differ from run to run and were sometimes inf (the
    # site's train step then refuses the step: measured 2026-12-07; deterministic at 24^3 and above, fp32 always).
    overrides = {"val-fraction": 0.5, "precision": "fp32", **parse_overrides(args.run_config)}
    from strpnet_core.federation import MIN_EVAL_PATIENTS, split_indices

    n_train = len(split_indices(args.patients, float(overrides["val-fraction"]), 0, "site-01")[0])
    if n_train < MIN_EVAL_PATIENTS:
        ap.error(f"--patients {args.patients}: a site would train on {n_train} patient(s), fewer than the small-count "
                 f"rule's {MIN_EVAL_PATIENTS}, which zeroes the training seconds this benchmark reports; give more")
    counts = [int(x) for x in args.sites.split(",")]
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-federation-"))
    results = []
    for n in counts:
        caches = write_caches(base / f"caches-{n}", n, args.patients, args.size, timepoints=args.timepoints)
        run_dir = base / f"run-{n}"
        t0 = time.monotonic()
        with PeakMemory() as mem:
            simulate(run_dir, data=None, cache=caches, sites=n, rounds=args.rounds, preset="ci",
                     gpus_per_site=args.gpus_per_site, overrides=overrides, timeout_s=1800, progress=False)
        wall = time.monotonic() - t0
        rows = json.loads((run_dir / "metrics.json").read_text())
        results.append((n, wall, mem.peak, rows))

    print("\n1. round wall time vs slowest site's local training (s)")
    print(f"{'sites':>5} {'round':>5} {'round wall':>10} {'slowest site':>12} {'mean site':>9} {'overhead':>8}")
    for n, _, _, rows in results:
        for r in rows:
            slow, mean = r.get("train_seconds_max") or 0.0, r.get("train_seconds") or 0.0
            print(f"{n:>5} {r['round']:>5} {r['round_seconds']:>10.1f} {slow:>12.1f} {mean:>9.1f} "
                  f"{r['round_seconds'] - slow:>8.1f}")

    print("\n2. payload bytes per round per site (ArrayRecord) vs model size")
    print(f"{'sites':>5} {'model bytes':>12} {'down/site':>10} {'up/site':>10} {'total/round':>12}")
    for n, _, _, rows in results:
        mb = rows[0]["model_bytes"]
        down, up = 2 * mb, mb  # global model for train + evaluate; trained model back
        print(f"{n:>5} {mb:>12,} {down:>10,} {up:>10,} {n * (down + up):>12,}")

    print(f"\n3. simulation ({args.rounds} rounds, {args.patients} patients/site, {args.size}^3 caches, "
          f"{args.timepoints} scans, GPUs per site: {'shared' if args.gpus_per_site is None else args.gpus_per_site})")
    print(f"{'sites':>5} {'wall s':>8} {'s/round':>8} {'peak RSS MB':>12} {'CUDA share':>10}")
    for n, wall, peak, rows in results:
        cuda = np.mean([r.get("train_cuda") or 0.0 for r in rows])  # null: every site below the small-count rule
        print(f"{n:>5} {wall:>8.1f} {np.mean([r['round_seconds'] for r in rows]):>8.1f} {peak / 2**20:>12.0f} "
              f"{cuda:>10.2f}")
    print(f"\nruns in {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
