"""The study of issue 7: FL (FedAvg through ``strpnet simulate``) vs centralised vs local-only ST-RPNet, a
cavity-margin recurrence map, a Cox model on simple volumes and the oracle, on a held-out synthetic test site.

    python benchmarks/study/run_study.py --config smoke --out runs/study-smoke             # CI-sized, minutes
    python benchmarks/study/run_study.py --config full  --out runs/study-full --publish    # ~1 h on 2 cores

Stages (each resumable: its outputs are written atomically and reused when present):

1. cohort: ``strpnet_core.synth.generate_cohort`` with the training sites plus one more site, the test site
   (``OUT/cohort``; its truth gives the oracle).
2. preprocessing: ``strpnet_core.federation.prepare_site_cache`` per site (``OUT/cache/train/<site>``,
   ``OUT/cache/test/<site>``): the federation only ever gets the training caches' root.
3. baselines and oracle, fitted on the training caches, predicted on the test site (``OUT/predictions``).
4. per seed: FL (``strpnet_core.commands.simulate.simulate`` on the training caches), centralised and local-only
   (``strpnet_core.training.train_epochs``, rounds x local-epochs epochs), each predicted on the test site.
5. report: bootstrap statistics, goals, PNGs and ``OUT/results.md`` (``--publish``: also ``docs/results.md`` and
   ``docs/images/results/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from benchmarks.study import evaluate, report  # noqa: E402
from benchmarks.study.config import CONFIGS, StudyConfig, get_config  # noqa: E402
from strpnet_core.fsutil import atomic_write_json, atomic_write_text  # noqa: E402

CONFIG_FILE = "study_config.json"


def log(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


class Study:
    """Paths and stages of one study run directory."""

    def __init__(self, cfg: StudyConfig, out: Path, *, workers: int | None = None, progress: bool = False) -> None:
        self.cfg = cfg
        self.out = out.resolve()
        self.workers = workers or cfg.workers
        self.progress = progress
        self.cohort = self.out / "cohort"
        self.train_cache_root = self.out / "cache" / "train"
        self.test_cache_root = self.out / "cache" / "test"
        self.pred_dir = self.out / "predictions"
        self.runs = self.out / "runs"
        self.timings: dict[str, float] = {}
        self.train_sites = [f"site-{i + 1:02d}" for i in range(cfg.n_sites)]
        self.test_site = f"site-{cfg.n_sites + 1:02d}"

    # ------------------------------------------------------------------------------------------------ bookkeeping
    def check_config(self) -> None:
        """Refuse a run directory made with another configuration (its caches and models would not match)."""
        path = self.out / CONFIG_FILE
        mine = self.cfg.to_dict()
        if path.is_file():
            theirs = json.loads(path.read_text())
            if theirs != json.loads(json.dumps(mine)):
                raise SystemExit(f"{self.out} holds a study made with another configuration ({path}); use another "
                                 "--out or delete it")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, mine)

    def timed(self, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a stage and add its wall time to this invocation's timings."""
        t0 = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.monotonic() - t0

    def merged_timings(self) -> dict[str, float]:
        """Stage times of the invocations that did the work: a stage measured now replaces the stored figure only
        when it took longer than 5 s (a re-run that reuses a stage's outputs keeps the first figure)."""
        path = self.out / "timings.json"
        stored: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
        for k, v in self.timings.items():
            if k not in stored or v > 5.0:
                stored[k] = v
        atomic_write_json(path, stored)
        return stored

    # ------------------------------------------------------------------------------------------------ 1. cohort
    def make_cohort(self) -> dict[str, Any]:
        meta = self.cohort / "truth" / "cohort.json"
        if not meta.is_file():
            from strpnet_core.synth import generate_cohort

            counts = [*self.cfg.train_patients, self.cfg.test_patients]
            log(f"generating the {self.cfg.preset} cohort: sites {counts} (the last is the test site)")
            generate_cohort(self.cohort, sites=len(counts), patients=counts, preset=self.cfg.preset,
                            seed=self.cfg.data_seed, workers=self.workers, progress=self.progress, png=False)
        else:
            log(f"reusing the cohort in {self.cohort}")
        return json.loads(meta.read_text())

    # ------------------------------------------------------------------------------------------------ 2. caches
    def preprocess(self) -> None:
        from strpnet_core.federation import prepare_site_cache

        for site in [*self.train_sites, self.test_site]:
            root = self.test_cache_root if site == self.test_site else self.train_cache_root
            t0 = time.monotonic()
            info = prepare_site_cache(self.cohort / site, root / site, site_name=site, preset=self.cfg.preset,
                                      seed=self.cfg.data_seed, workers=self.workers, progress=self.progress)
            log(f"{site}: {info.num_patients} patients cached ({time.monotonic() - t0:.0f} s)")

    # ------------------------------------------------------------------------------------------------ 3. baselines
    def baselines(self) -> dict[str, Any]:
        paths = {m: self.pred_dir / f"{m}.json" for m in ("cavity-margin", "cox-volumes", "oracle")}
        if not all(p.is_file() for p in paths.values()):
            log("fitting the baselines on the training sites, predicting the test site")
            out = evaluate.run_baselines(
                [self.train_cache_root / s for s in self.train_sites], self.test_cache_root / self.test_site,
                self.cohort / "truth", margins_mm=self.cfg.margins_mm, penalizer=self.cfg.cox_penalizer)
            for m, (records, info) in out.items():
                evaluate.write_predictions(paths[m], m, records, info)
        return {m: json.loads(p.read_text())["info"] for m, p in paths.items()}

    # ------------------------------------------------------------------------------------------------ 4. deep models
    def fed_config(self, seed: int) -> Any:
        from strpnet_core.federation import RUN_DEFAULTS, FederationConfig

        values = {**RUN_DEFAULTS, **self.cfg.fl_overrides(), "seed": seed, "preset": self.cfg.preset,
                  "num-server-rounds": self.cfg.rounds}
        return FederationConfig.from_run_config(values)

    def train_fl(self, seed: int) -> Path:
        from strpnet_core.commands.simulate import simulate

        run_dir = self.runs / f"fl-seed{seed}"
        summary = run_dir / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("rounds_completed") == self.cfg.rounds \
                and (run_dir / "final_model.pt").is_file():
            log(f"FL seed {seed}: reusing {run_dir}")
            return run_dir / "final_model.pt"
        log(f"FL seed {seed}: {self.cfg.n_sites} sites x {self.cfg.rounds} rounds via strpnet simulate -> {run_dir}")
        simulate(run_dir, data=None, cache=self.train_cache_root, sites=self.cfg.n_sites, rounds=self.cfg.rounds,
                 preset=self.cfg.preset, seed=seed, workers=self.workers, resume=run_dir.exists(),
                 overrides=self.cfg.fl_overrides(), progress=self.progress)
        # A round in which no site trained leaves the initial weights: such a model must not enter the comparison.
        rows = json.loads((run_dir / "metrics.json").read_text())
        idle = [r["round"] for r in rows if not r.get("train_sites")]
        if idle:
            raise RuntimeError(f"FL seed {seed}: no site trained in round(s) {idle} (train failures "
                               f"{[r.get('train_failures') for r in rows]}); the sites' errors are in {run_dir}/flower")
        return run_dir / "final_model.pt"

    def train_pooled(self, name: str, caches: list[Path], seed: int) -> Path:
        """Centralised (several caches pooled) or local-only (one cache): rounds x local-epochs epochs, same initial
        weights as the federation's seed (``federation.build_model``)."""
        from strpnet_core.dataset import PatientDataset
        from strpnet_core.federation import build_model, derive_seed
        from strpnet_core.training import save_trained_model, seed_everything, train_epochs

        run_dir = self.runs / f"{name}-seed{seed}"
        model_file = run_dir / "final_model.pt"
        if model_file.is_file():
            log(f"{name} seed {seed}: reusing {model_file}")
            return model_file
        fed = self.fed_config(seed)
        train_cfg = dataclasses.replace(fed.train_config(), local_epochs=self.cfg.epochs, num_threads=self.cfg.threads)
        model = build_model(fed)
        dataset = PatientDataset(caches, require_outcome=True)  # as the federated sites train
        train_seed = derive_seed(seed, "study", name)
        seed_everything(train_seed)
        log(f"{name} seed {seed}: {len(dataset)} patients x {self.cfg.epochs} epochs")
        t0 = time.monotonic()
        result = train_epochs(model, dataset, train_cfg, seed=train_seed, progress=self.progress)
        model.to("cpu")
        save_trained_model(model_file, model, train_cfg, info={
            "method": name, "seed": seed, "train_seed": train_seed, "caches": [str(c) for c in caches],
            "epoch_losses": result.epoch_losses, "seconds": time.monotonic() - t0})
        return model_file

    def predict(self, method: str, seed: int, model_file: Path) -> None:
        path = self.pred_dir / f"{method}-seed{seed}.json"
        if path.is_file():
            return
        records = evaluate.predict_deep(model_file, self.test_cache_root / self.test_site,
                                        num_threads=self.cfg.threads)
        evaluate.write_predictions(path, method, records, {"seed": seed, "model": str(model_file)})

    def deep_models(self) -> None:
        for seed in self.cfg.seeds:
            fl = self.timed("training: FL (strpnet simulate)", self.train_fl, seed)
            self.timed("prediction on the test site", self.predict, "fl", seed, fl)
            central = self.timed("training: centralised", self.train_pooled, "central",
                                 [self.train_cache_root / s for s in self.train_sites], seed)
            self.timed("prediction on the test site", self.predict, "central", seed, central)
            for site in self.train_sites:
                local = self.timed("training: local-only", self.train_pooled, f"local-{site}",
                                   [self.train_cache_root / site], seed)
                self.timed("prediction on the test site", self.predict, f"local-{site}", seed, local)

    # ------------------------------------------------------------------------------------------------ 5. report
    def methods(self) -> list[report.Method]:
        def runs(prefix: str) -> list[dict[str, Any]]:
            return [evaluate.read_predictions(self.pred_dir / f"{prefix}-seed{s}.json") for s in self.cfg.seeds]

        ms = [report.Method("fl", f"FL (FedAvg, {self.cfg.n_sites} sites)", "deep", runs("fl")),
              report.Method("central", "centralised (pooled)", "deep", runs("central"))]
        for site in self.train_sites:
            ms.append(report.Method(f"local-{site}", f"local-only {site}", "deep", runs(f"local-{site}")))
        for key, label, kind in (("cavity-margin", "cavity margin in FLAIR (no DL)", "baseline"),
                                 ("cox-volumes", "Cox on volumes (no DL)", "baseline"),
                                 ("oracle", "oracle (true risk)", "oracle")):
            ms.append(report.Method(key, label, kind, [evaluate.read_predictions(self.pred_dir / f"{key}.json")]))
        return ms

    def reading(self) -> str | None:
        """The hand-written reading of this configuration's results (``reading-<config>.md`` beside this script)."""
        path = Path(__file__).resolve().parent / f"reading-{self.cfg.name}.md"
        return path.read_text() if path.is_file() else None

    def write_report(self, cohort: dict[str, Any], baseline_info: dict[str, Any], publish: Path | None,
                     command: str) -> Path:
        import numpy as np

        from strpnet_core.baselines import harrell_c, uno_horizon
        from strpnet_core.cache import load_cache_header
        from strpnet_core.metrics import concordance_counts

        train_files = evaluate.cache_patients([self.train_cache_root / s for s in self.train_sites])
        tt, te = [], []
        for f in train_files:
            p = load_cache_header(f)
            tt.append(float(p.time or 0.0))
            te.append(int(p.event or 0))
        train_time, train_event = np.array(tt), np.array(te)
        tau = uno_horizon(train_time, self.cfg.uno_horizon_days)
        methods = self.methods()
        result = report.compute_statistics(methods, train_time=train_time, train_event=train_event, tau=tau,
                                           n_boot=self.cfg.n_boot, boot_seed=self.cfg.boot_seed)
        goals = report.evaluate_goals(methods, result)
        test = methods[0].runs[0]["patients"]
        t = np.array([p["time"] for p in test])
        e = np.array([p["event"] for p in test])
        pairs = concordance_counts(np.zeros(len(t)), t, e).comparable
        orc = result["stats"].get("oracle", {}).get("harrell", {})
        lo, hi = orc.get("ci", [float("nan")] * 2)
        sites = []
        for s in cohort["sites"]:
            pts = [p for p in cohort["patients"] if p["site"] == s["name"]]
            sites.append({"name": s["name"], "role": "test" if s["name"] == self.test_site else "training",
                          "patients": len(pts), "events": int(sum(p["event"] for p in pts)),
                          "aggressiveness": s.get("aggressiveness", float("nan")),
                          "skull": "on" if s.get("skull") else "stripped"})
        context = {
            "sites": sites, "n_test": len(test), "n_test_events": int(e.sum()),
            "n_test_labelled": int(sum(1 for p in test if p.get("has_label"))), "test_pairs": pairs,
            "harrell_halfwidth": (hi - lo) / 2 if np.isfinite(lo) else float("nan"),
            "n_train": len(train_files), "epochs": self.cfg.epochs, "rounds": self.cfg.rounds,
            "local_epochs": self.cfg.local_epochs, "tau": tau, "baselines": baseline_info,
            "oracle_c_test_full": harrell_c([p["risk"] for p in methods[-1].runs[0]["patients"]], t, e),
        }
        fl_hist = {}
        for seed in self.cfg.seeds:
            mfile = self.runs / f"fl-seed{seed}" / "metrics.json"
            if mfile.is_file():
                fl_hist[seed] = json.loads(mfile.read_text())
        img_dir = self.out / report.IMAGES_SUBDIR
        images = report.write_plots(methods, result["stats"], img_dir, fl_hist)
        md = self.out / "results.md"
        report.write_markdown(md, cfg=self.cfg.to_dict(), methods=methods, result=result, goals=goals,
                              context=context, images=images, timings=self.merged_timings(), command=command,
                              reading=self.reading())
        report.write_results_json(self.out / "results.json", result, goals, context)
        log(f"wrote {md}")
        print(report.results_table(methods, result["stats"]), flush=True)
        for g in goals:
            print(f"  [{'met' if g['passed'] else 'MISSED'}] {g['goal']}: {g['numbers']}", flush=True)
        if publish is not None:
            dest_img = publish / report.IMAGES_SUBDIR
            dest_img.mkdir(parents=True, exist_ok=True)
            for name in images:
                tmp = dest_img / f".{name}.part"
                shutil.copyfile(img_dir / name, tmp)
                os.replace(tmp, dest_img / name)
            tmp = publish / ".results.md.part"
            shutil.copyfile(md, tmp)
            os.replace(tmp, publish / "results.md")
            log(f"published {publish / 'results.md'} and {dest_img}")
        return md


def estimate_text(cfg: StudyConfig) -> str:
    est = cfg.estimate_seconds()
    parts = ", ".join(f"{k} ~{v / 60:.1f} min" for k, v in est.items())
    return f"time estimate on 2 cores (first run; preprocessing is cached afterwards): {parts}; " \
           f"total ~{sum(est.values()) / 60:.0f} min"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="smoke", choices=sorted(CONFIGS), help="study configuration (default smoke)")
    ap.add_argument("--out", required=True, type=Path, help="run directory (resumable)")
    ap.add_argument("--workers", type=int, default=None, help="processes for generation/preprocessing")
    ap.add_argument("--publish", action="store_true",
                    help="also write docs/results.md and docs/images/results/ of this repository")
    ap.add_argument("--publish-to", type=Path, default=None, help="folder to publish results.md and images/ into")
    ap.add_argument("--report-only", action="store_true", help="only redraw the report from existing predictions")
    ap.add_argument("--estimate", action="store_true", help="print the time estimate and exit")
    ap.add_argument("--progress", action="store_true", help="progress bars")
    args = ap.parse_args(argv)
    cfg = get_config(args.config)
    log(estimate_text(cfg))
    if args.estimate:
        return 0
    study = Study(cfg, args.out, workers=args.workers, progress=args.progress)
    study.check_config()
    t0 = time.monotonic()
    cohort = study.timed("cohort", study.make_cohort)
    if not args.report_only:
        study.timed("preprocessing", study.preprocess)
    baseline_info = study.timed("baselines", study.baselines)
    if not args.report_only:
        study.deep_models()
    publish = args.publish_to or (REPO / "docs" if args.publish else None)
    command = "python benchmarks/study/run_study.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    cmd_file = study.out / "command.txt"
    if not args.report_only or not cmd_file.is_file():
        atomic_write_text(cmd_file, command + "\n")  # the invocation that produced the models and predictions
    command = cmd_file.read_text().strip()
    study.timed("report", study.write_report, cohort, baseline_info, publish, command)
    log(f"done in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
