"""HTML report of a federated run (``strpnet report RUN_DIR``): one self-contained page with PNG plots beside it.

Sections of ``OUT/report.html`` (``OUT`` defaults to ``RUN_DIR/report``; images are linked by relative names)::

    run          rounds, final and best federated C-index, configuration (summary.json)
    per round    federated C-index (pooled pair counts), pooled Dice, evaluation and training loss   rounds.png
    per site     each site's own aggregate counts of the last round: training / evaluated patients,
                 events, comparable pairs, its C-index and Dice from its counts (``per_site`` rows)      sites.png
    test set     (optional, --test-cache / --test-data: the coordinator's own held-out patients, which
                 no site has seen) C-index, Dice, Kaplan-Meier curves of the low / high predicted-risk
                 groups with the log-rank p-value                                                      km.png
                 overlays of 2-3 test patients: T1c and FLAIR of the latest scan, predicted recurrence
                 probability, true recurrence outline                                             overlay-<k>.png

Risk groups: a test patient is *high risk* when its predicted risk ``r > m``, where ``m`` is the median of the
training sites' pooled risk distribution (``RUN_DIR/risk_reference.json``, quantile 50; aggregates only) when the run
wrote one, else the median of the test patients' risks. Kaplan-Meier estimates and the log-rank test come from
lifelines; the C-index and Dice of the test set from :func:`strpnet_core.training.evaluate_model` (the definitions of
the federated evaluation).

Privacy: the page shows only what the coordinator holds: pooled and per-site aggregate counts the sites sent, and
its own test patients. No per-patient value of a site appears.

Everything is written atomically (images first, the page last), so a reader never sees a page with missing images.
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .fsutil import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

#: Files of a run directory (written by ``server/outputs.py`` and ``strpnet_core.risk_reference``).
METRICS_JSON = "metrics.json"
SUMMARY_JSON = "summary.json"
#: Written by ``flower-server`` (deployment): ``{"site_names": {node id: name of the site's key file}}``.
SITES_JSON = "sites.json"
FINAL_MODEL = "final_model.pt"
RISK_REFERENCE_JSON = "risk_reference.json"
#: Outputs of the report.
REPORT_HTML = "report.html"
DEFAULT_SUBDIR = "report"
ROUNDS_PNG = "rounds.png"
SITES_PNG = "sites.png"
KM_PNG = "km.png"
OVERLAY_PNG = "overlay-{k}.png"
#: Probability above which a voxel is predicted as recurrence (the cut of the federated Dice: logit > 0).
MAP_THRESHOLD = 0.5


class ReportError(ValueError):
    """The run directory or the test set cannot be used; the message names the file and the reason."""


# ----------------------------------------------------------------------------------------------------------------------
# reading a run directory
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunRecord:
    """What a run directory holds.

    Attributes
    ----------
    run_dir:
        The folder.
    rows:
        ``metrics.json``: one dict per completed round (``round`` first; pooled counts and derived metrics,
        ``per_site`` rows when the server recorded them).
    summary:
        ``summary.json`` (None when the run has not finished: the server writes it last).
    model_path:
        ``final_model.pt`` when present.
    site_names:
        Node id (str) -> site name, from ``sites.json`` (a deployment run's; empty otherwise).
    """

    run_dir: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any] | None
    model_path: Path | None
    site_names: dict[str, str] = field(default_factory=dict)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ReportError(f"{path}: unreadable ({type(exc).__name__}: {exc}); the file is corrupt or truncated")


def load_run(run_dir: str | os.PathLike[str]) -> RunRecord:
    """Read and check a run directory of ``strpnet simulate`` / ``flower-server``.

    Raises
    ------
    ReportError
        The folder does not exist, holds no ``metrics.json`` (not a run directory, or no round completed), or a
        file is not valid JSON or does not have the expected shape (the file and the row are named).
    """
    rd = Path(run_dir)
    if not rd.is_dir():
        raise ReportError(f"{rd}: not a directory (give the run directory of strpnet simulate or flower-server)")
    mpath = rd / METRICS_JSON
    if not mpath.is_file():
        raise ReportError(f"{rd}: no {METRICS_JSON}: not a federated run directory, or no round has completed yet")
    rows = _read_json(mpath)
    if not isinstance(rows, list) or not rows:
        got = "an empty list" if rows == [] else type(rows).__name__
        raise ReportError(f"{mpath}: expected a non-empty JSON list of rounds, got {got}")
    if isinstance(rows[0], dict) and "epoch" in rows[0] and "round" not in rows[0]:
        raise ReportError(f"{rd}: a `strpnet train` run (per-epoch rows in {METRICS_JSON}); the report is made for "
                          "federated runs (strpnet simulate, flower-server)")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or isinstance(row.get("round"), bool) or not isinstance(row.get("round"), int):
            raise ReportError(f"{mpath}: row {i} is not a round record (a JSON object with an integer 'round')")
        for key in ("c_index", "dice", "eval_loss", "train_loss"):
            v = row.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
                raise ReportError(f"{mpath}: round {row['round']}: {key} = {v!r} is not a number")
        sites = row.get("per_site")
        if sites is not None and (not isinstance(sites, list) or not all(isinstance(s, dict) for s in sites)):
            raise ReportError(f"{mpath}: round {row['round']}: per_site must be a list of objects")
    spath = rd / SUMMARY_JSON
    summary = None
    if spath.is_file():
        summary = _read_json(spath)
        if not isinstance(summary, dict):
            raise ReportError(f"{spath}: expected a JSON object, got {type(summary).__name__}")
    names: dict[str, str] = {}
    npath = rd / SITES_JSON
    if npath.is_file():  # labels only: a bad file is named and the sites are numbered
        try:
            doc = _read_json(npath)
        except ReportError as exc:
            doc = None
            log.warning("%s", exc)
        got = doc.get("site_names") if isinstance(doc, dict) else None
        if isinstance(got, dict) and all(isinstance(v, str) for v in got.values()):
            names = got
        elif doc is not None:
            log.warning("%s: expected {\"site_names\": {node id: name}}; the sites are numbered instead", npath)
    model = rd / FINAL_MODEL
    return RunRecord(rd, rows, summary, model if model.is_file() else None, names)  # JSON keys: str already


# ----------------------------------------------------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------------------------------------------------
def _num(v: Any) -> float:
    """A finite float, or NaN for None / non-numbers / inf."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def site_table(row: Mapping[str, Any], names: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Per-site rows of a round (its ``per_site`` list) with each site's C-index and Dice from its own counts.

    For site ``s``: ``C_s = (concordant_s + tied_risk_s / 2) / comparable_s`` (NaN without a comparable pair) and
    ``Dice_s = 2 I_s / D_s`` (``metrics.dice_from_counts``; NaN when ``D_s = 0``: the site counted no labelled
    patient, e.g. below its small-count rule). Sites are ordered by node id (numeric) and labelled with their name
    in ``names`` (node id -> name: ``sites.json`` of a deployment run), else ``site 1..S``; the node id is kept
    beside the label.

    Returns
    -------
    list of dict
        ``label, node, train_examples, train_loss, n_patients, n_events, comparable, c_index, dice`` (NaN where
        the site did not send the number); empty when the round has no ``per_site`` rows.
    """
    from .metrics import ConcordanceCounts, dice_from_counts

    out = []
    def node_order(site: Mapping[str, Any]) -> tuple[int, str]:
        node = str(site.get("node"))
        return (int(node), "") if node.isdigit() else (-1, node)

    for i, s in enumerate(sorted(row.get("per_site") or [], key=node_order)):
        node = str(s.get("node", "?"))
        rec: dict[str, Any] = {"label": (names or {}).get(node, f"site {i + 1}"), "node": node}
        for k in ("train_examples", "train_loss", "n_patients", "n_events", "comparable"):
            rec[k] = _num(s.get(k))
        try:
            rec["c_index"] = ConcordanceCounts.from_dict(s).c_index
        except (KeyError, TypeError, ValueError):
            rec["c_index"] = math.nan
        di, dd = _num(s.get("dice_intersection")), _num(s.get("dice_denominator"))
        rec["dice"] = dice_from_counts(di, dd) if math.isfinite(di) and math.isfinite(dd) and dd > 0 else math.nan
        out.append(rec)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, dpi: int = 100) -> Path:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_rounds(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Federated C-index (labelled with its comparable pairs), pooled Dice and the losses per round -> PNG; with the
    coordinator test set's C-index and Dice (server-side evaluation, ``test-cache``) when the run has them."""
    plt = _pyplot()
    r = [int(row["round"]) for row in rows]
    get = lambda k: [_num(row.get(k)) for row in rows]  # noqa: E731
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    ax = axes[0]
    ax.plot(r, get("c_index"), "o-", color="tab:blue")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    for x, c, p in zip(r, get("c_index"), get("comparable"), strict=True):
        if math.isfinite(c) and math.isfinite(p):
            ax.annotate(f"{p:.0f} pairs", (x, c), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    test = any("test_c_index" in row for row in rows)
    if test:
        ax.plot(r, get("test_c_index"), "s--", color="tab:orange", label="coordinator test set")
        ax.legend(fontsize=8, loc="lower right")
    ax.set(title="federated C-index (pooled pairs)", xlabel="round", ylim=(0, 1.05))
    ax = axes[1]
    ax.plot(r, get("dice"), "o-", color="tab:green", label="sites (pooled)")
    if test:
        ax.plot(r, get("test_dice"), "s--", color="tab:orange", label="coordinator test set")
        ax.legend(fontsize=8)
    ax.set(title="pooled Dice (recurrence map)", xlabel="round", ylim=(0, 1.05))
    ax = axes[2]
    ax.plot(r, get("eval_loss"), "o-", label="evaluation (segmentation)")
    ax.plot(r, get("train_loss"), "s--", label="training (total)")
    ax.set(title="loss", xlabel="round")
    ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(r)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_sites(sites: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Per-site sample sizes (training patients, evaluated patients, events) and per-site C-index / Dice -> PNG."""
    plt = _pyplot()
    labels = [s["label"] for s in sites]
    x = np.arange(len(sites))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    ax = axes[0]
    w = 0.27
    for j, (key, name) in enumerate((("train_examples", "training patients"), ("n_patients", "evaluated patients"),
                                     ("n_events", "events (evaluated)"))):
        ax.bar(x + (j - 1) * w, [np.nan_to_num(s[key]) for s in sites], w, label=name)
    ax.set(title="patients per site", xticks=x, xticklabels=labels)
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.bar(x - 0.2, [np.nan_to_num(s["c_index"], nan=0.0) for s in sites], 0.4, label="C-index (own pairs)")
    ax.bar(x + 0.2, [np.nan_to_num(s["dice"], nan=0.0) for s in sites], 0.4, label="Dice")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set(title="per-site metrics (last round; n/a drawn as 0)", xticks=x, xticklabels=labels, ylim=(0, 1.05))
    ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_km(time_days: Any, event: Any, high: Any, path: str | os.PathLike[str], *, title: str) -> Path:
    """Kaplan-Meier curves (lifelines, 95 % CI, numbers at risk) of the low- and high-risk groups -> PNG."""
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts

    plt = _pyplot()
    t, e, h = (np.asarray(a) for a in (time_days, event, high))
    fig, ax = plt.subplots(figsize=(7, 4.6))
    fitters = []
    for mask, name, color in ((~h, "low predicted risk", "tab:blue"), (h, "high predicted risk", "tab:red")):
        if mask.any():
            kmf = KaplanMeierFitter(label=f"{name} (n={int(mask.sum())})")
            kmf.fit(t[mask], event_observed=e[mask])
            kmf.plot_survival_function(ax=ax, ci_show=True, color=color)
            fitters.append(kmf)
    if fitters:
        add_at_risk_counts(*fitters, ax=ax, rows_to_show=["At risk", "Events"])
    ax.set(title=title, xlabel="days since pre-op scan", ylabel="recurrence-free probability", ylim=(0, 1.05))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_overlay(patient: Any, prob: np.ndarray, path: str | os.PathLike[str], *, title: str) -> Path:
    """Axial slice of the latest scan's T1c and FLAIR (model grid) with the predicted recurrence probability
    (hot colours, hidden below 5 %), the predicted region (prob > 0.5, yellow) and the true recurrence (cyan).

    The slice passes through the true recurrence's largest cross-section when the patient has a label, else
    through the probability maximum.
    """
    from .contract import MODALITIES

    plt = _pyplot()
    p = np.asarray(prob, dtype=np.float32)
    truth = None if patient.recurrence is None else np.asarray(patient.recurrence) > 0
    k = int(np.argmax(truth.sum(axis=(1, 2)))) if truth is not None and truth.any() else \
        int(np.unravel_index(int(np.argmax(p)), p.shape)[0])
    last = patient.num_timepoints - 1
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
    im = None
    for ax, mod in zip(axes, ("t1c", "t2f"), strict=True):
        a = np.asarray(patient.images[last, MODALITIES.index(mod), k], dtype=np.float32)
        inside = a[np.asarray(patient.brain_mask[k]) > 0]
        lo, hi = np.percentile(inside, [1, 99]) if inside.size else (float(a.min()), float(a.max()))
        ax.imshow(a, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1.0, interpolation="nearest")
        im = ax.imshow(np.ma.masked_less(p[k], 0.05), cmap="hot", vmin=0.0, vmax=1.0, alpha=0.55,
                       interpolation="nearest")
        if float(p[k].max()) > MAP_THRESHOLD:
            ax.contour(p[k], levels=[MAP_THRESHOLD], colors="yellow", linewidths=0.9)
        if truth is not None and truth[k].any():
            ax.contour(truth[k].astype(np.float32), levels=[0.5], colors="cyan", linewidths=1.1)
        ax.set_title(f"{mod.upper()}, scan {patient.timepoints[last]} (day {float(patient.days[last]):g}), "
                     f"slice {k}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.7, label="predicted recurrence probability")
    fig.suptitle(title + "\ncyan: true recurrence; yellow: predicted (p > 0.5)", fontsize=9)
    return _save(fig, Path(path), dpi=90)


# ----------------------------------------------------------------------------------------------------------------------
# the coordinator's test set
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class TestSetResult:
    """The final model on the coordinator's held-out test patients.

    Attributes
    ----------
    cache_dir:
        Where the test patients' cache files are.
    n_patients, n_events:
        Test patients with a known outcome, and those with an observed recurrence.
    n_excluded:
        Cache files without an outcome (not usable for survival).
    c_index, comparable, dice:
        Harrell's C over the test patients' comparable pairs, their number, and the pooled Dice.
    threshold, threshold_source:
        The risk cut between the groups and where it comes from.
    n_high, n_low, logrank_p:
        Group sizes and the log-rank test's p-value (None when a group is empty).
    km_png:
        The Kaplan-Meier figure.
    overlays:
        ``(png, caption)`` of the example patients.
    """

    cache_dir: Path
    n_patients: int
    n_events: int
    n_excluded: int
    c_index: float
    comparable: int
    dice: float
    threshold: float
    threshold_source: str
    n_high: int
    n_low: int
    logrank_p: float | None
    km_png: Path
    overlays: list[tuple[Path, str]] = field(default_factory=list)


def risk_threshold(risks: np.ndarray, reference: str | os.PathLike[str] | None) -> tuple[float, str]:
    """The cut between the risk groups: the training sites' pooled median (quantile 50 of a
    ``risk_reference.json``) when ``reference`` exists, else the median of ``risks``.

    Raises
    ------
    ReportError
        ``reference`` exists but is not a valid risk reference.
    """
    if reference is not None and Path(reference).is_file():
        from .risk_reference import load_risk_reference

        try:
            ref = load_risk_reference(reference)
        except ValueError as exc:
            raise ReportError(str(exc)) from None
        m = float(np.interp(50.0, ref.levels, ref.quantiles))
        return m, f"median of the training sites' pooled risk distribution ({ref.n_patients} patients, {reference})"
    return float(np.median(risks)), "median predicted risk of the test patients (the run has no risk_reference.json)"


def report_test_set(
    model_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    reference: str | os.PathLike[str] | None = None,
    preset: str | None = None,
    n_overlays: int = 3,
    device: str = "auto",
) -> TestSetResult:
    """Predict the test patients with the final model; write ``km.png`` and the overlays into ``out_dir``.

    Parameters
    ----------
    model_path:
        ``final_model.pt`` (``strpnet-fed-model/1``).
    cache_dir:
        Preprocessed test patients (``strpnet preprocess`` output), with outcomes.
    out_dir:
        Where the PNGs go.
    reference:
        A ``risk_reference.json`` (see :func:`risk_threshold`).
    preset:
        The run's preset; a cache built with another one is refused.
    n_overlays:
        Example patients drawn (labelled ones first, cache order).
    device:
        "auto", "cpu", "cuda" or "cuda:N".

    Raises
    ------
    ReportError
        Unreadable model, empty or mismatched cache, no patient with an outcome, a model that does not fit the grid.
    """
    import torch
    from lifelines.statistics import logrank_test
    from torch.utils.data import Subset

    from .cache import list_cache, load_cache_header, load_cached_patient
    from .dataset import PatientDataset, collate_patients, patient_to_item
    from .training import evaluate_model, load_trained_model, predict_batch

    cache = Path(cache_dir)
    out = Path(out_dir)
    try:
        model, cfg, _ = load_trained_model(model_path)
    except ValueError as exc:
        raise ReportError(str(exc)) from None
    try:
        cfg = dataclasses.replace(cfg, device=device)
    except ValueError as exc:
        raise ReportError(f"--device {device!r}: {exc}") from None
    files = list_cache(cache) if cache.is_dir() else []
    if not files:
        raise ReportError(f"--test-cache {cache}: no cache file (<patient>.npz) found; build one with "
                          f"`strpnet preprocess SITE_DIR --out {cache}`")
    try:
        dataset = PatientDataset(files)
        heads = [load_cache_header(f) for f in files]
    except ValueError as exc:
        raise ReportError(f"--test-cache {cache}: {exc}") from None
    got = heads[0].meta.get("preset") if isinstance(heads[0].meta, dict) else None
    if preset is not None and got is not None and got != preset:
        raise ReportError(f"--test-cache {cache}: built with preset {got!r}, but the model was trained with "
                          f"{preset!r}; preprocess the test site with --preset {preset}")
    keep = [i for i, p in enumerate(heads) if p.event is not None and p.time is not None]
    if not keep:
        raise ReportError(f"--test-cache {cache}: no patient has an outcome (event, time): nothing to evaluate")
    subset = Subset(dataset, keep)
    try:
        risk_list: list[float] = []
        agg = evaluate_model(model, subset, cfg, risks_out=risk_list)
        risks = np.asarray(risk_list, dtype=np.float64)
    except (ValueError, RuntimeError) as exc:
        raise ReportError(f"the model of {model_path} cannot run on the patients of {cache}: {exc}") from None
    times = np.array([float(heads[i].time) for i in keep])
    events = np.array([int(heads[i].event) for i in keep])
    threshold, source = risk_threshold(risks, reference)
    high = risks > threshold
    from_reference = reference is not None and Path(reference).is_file()
    if from_reference and (high.all() or not high.any()):
        median = float(np.median(risks))
        source = (f"median predicted risk of the test patients: the training sites' median ({threshold:.4g}) put "
                  f"all {len(risks)} test patients in one group")
        threshold, high = median, risks > median
    p_value = None
    if high.any() and (~high).any():
        p_value = float(logrank_test(times[high], times[~high], events[high], events[~high]).p_value)
    km = plot_km(times, events, high, out / KM_PNG,
                 title=f"test set: {len(keep)} patients, C-index {agg.c_index:.3f}, log-rank p "
                       f"{'n/a' if p_value is None else f'{p_value:.3g}'}")

    order = sorted(keep, key=lambda i: (not heads[i].has_recurrence, i))[: max(0, n_overlays)]
    overlays = []
    model.eval()
    for k, i in enumerate(order):
        patient = load_cached_patient(files[i])
        with torch.no_grad():
            prob, risk = predict_batch(model, collate_patients([patient_to_item(patient)]), cfg)
        j = keep.index(i)
        group = "high" if high[j] else "low"
        outcome = f"recurrence at day {patient.time:g}" if patient.event else f"censored at day {patient.time:g}"
        caption = f"{patient.patient_id}: risk {float(risk[0]):.4g} ({group}-risk group), {outcome}"
        png = plot_overlay(patient, prob[0, 0].numpy() * (np.asarray(patient.brain_mask) > 0),
                           out / OVERLAY_PNG.format(k=k + 1), title=caption)
        overlays.append((png, caption))
    return TestSetResult(cache, len(keep), int(events.sum()), len(files) - len(keep), float(agg.c_index),
                         int(agg.comparable), float(agg.dice), threshold, source, int(high.sum()),
                         int((~high).sum()), p_value, km, overlays)


# ----------------------------------------------------------------------------------------------------------------------
# the page
# ----------------------------------------------------------------------------------------------------------------------
def format_value(v: Any, spec: str = ".3f") -> str:
    """``v`` formatted with ``spec``, or ``n/a`` when it is missing or not a finite number (page and console)."""
    x = _num(v)
    return "n/a" if not math.isfinite(x) else format(x, spec)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], cls: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    thead = f"<thead><tr>{head}</tr></thead>\n" if any(headers) else ""
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}">\n{thead}<tbody>\n{body}\n</tbody>\n</table>'


def _img(png: Path, alt: str) -> str:
    return f'<figure><img src="{html.escape(png.name)}" alt="{html.escape(alt)}"><figcaption>' \
           f"{html.escape(alt)}</figcaption></figure>"


_CSS = """body{font-family:sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #bbb;padding:.25em .6em;
text-align:right}th{background:#eee}td:first-child,th:first-child{text-align:left}img{max-width:100%}
figure{margin:.8em 0}figcaption{font-size:.85em;color:#555}.note{color:#555;font-size:.9em}"""


@dataclass(frozen=True)
class ReportResult:
    """Paths written by :func:`write_report`."""

    html: Path
    images: list[Path]
    test: TestSetResult | None


def write_report(
    run_dir: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    test_cache: str | os.PathLike[str] | None = None,
    test_data: str | os.PathLike[str] | None = None,
    n_overlays: int = 3,
    device: str = "auto",
    seed: int = 0,
    workers: int | None = None,
) -> ReportResult:
    """Write ``report.html`` and its PNGs for a run directory (see the module docstring).

    Parameters
    ----------
    run_dir:
        The run directory (``metrics.json`` required; ``summary.json``, ``final_model.pt``, ``risk_reference.json``
        used when present).
    out_dir:
        Output folder (default ``RUN_DIR/report``).
    test_cache:
        The coordinator's preprocessed test patients (with outcomes).
    test_data:
        Or a raw test site folder: validated and preprocessed with the run's preset into ``OUT/test-cache``
        (reused on a second call).
    n_overlays:
        Example test patients drawn.
    device:
        Device of the test-set predictions.
    seed, workers:
        Preprocessing of ``test_data`` (``workers`` None: one per core within the available memory).

    Raises
    ------
    ReportError
        See :func:`load_run` and :func:`report_test_set`; also a test set without ``final_model.pt``.
    """
    t0 = time.perf_counter()
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir / DEFAULT_SUBDIR
    out.mkdir(parents=True, exist_ok=True)
    summary = run.summary or {}
    config = summary.get("config") if isinstance(summary.get("config"), dict) else {}
    preset = config.get("preset")
    images = [plot_rounds(run.rows, out / ROUNDS_PNG)]

    last_sites = next((r for r in reversed(run.rows) if r.get("per_site")), None)
    sites = site_table(last_sites, run.site_names) if last_sites is not None else []
    if sites:
        images.append(plot_sites(sites, out / SITES_PNG))

    test = None
    if test_cache is not None and test_data is not None:
        raise ReportError("give either --test-cache or --test-data, not both")
    if test_cache is None and test_data is None and config.get("test_cache"):
        test_cache = config["test_cache"]  # the run's own coordinator test set (server-side evaluation)
        if not Path(test_cache).is_dir():
            raise ReportError(f"{run.run_dir}: the run's test-cache {test_cache} is gone; give --test-cache or "
                              f"--test-data")
    if test_cache is not None or test_data is not None:
        if run.model_path is None:
            raise ReportError(f"{run.run_dir}: no {FINAL_MODEL} (the run has not finished): cannot predict the "
                              f"test set")
        if test_data is not None:
            from .federation import prepare_site_cache

            data = Path(test_data)
            if not data.is_dir():
                raise ReportError(f"--test-data {data}: not a directory")
            if preset is None:
                raise ReportError(f"{run.run_dir}: no preset in {SUMMARY_JSON}; preprocess the test site yourself "
                                  f"(strpnet preprocess) and give --test-cache")
            test_cache = out / "test-cache"
            try:
                prepare_site_cache(data, test_cache, site_name=data.name, preset=str(preset), seed=seed,
                                   workers=workers)
            except (ValueError, FileNotFoundError) as exc:
                raise ReportError(f"--test-data {data}: {exc}") from None
        test = report_test_set(run.model_path, test_cache, out, reference=run.run_dir / RISK_REFERENCE_JSON,
                               preset=preset, n_overlays=n_overlays, device=device)
        images += [test.km_png, *(p for p, _ in test.overlays)]

    page = _page(run, summary, config, sites, last_sites, test, time.perf_counter() - t0)
    html_path = out / REPORT_HTML
    atomic_write_text(html_path, page)
    return ReportResult(html_path, images, test)


def _page(run: RunRecord, summary: Mapping[str, Any], config: Mapping[str, Any], sites: list[dict[str, Any]],
          last_sites: Mapping[str, Any] | None, test: TestSetResult | None, seconds: float) -> str:
    rows = run.rows
    last = rows[-1]
    title = f"ST-RPNet federated run: {run.run_dir.name}"
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}"
             f"</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>"]

    # run
    status = (f"{summary.get('rounds_completed', last['round'])} of {summary.get('num_server_rounds', '?')} rounds"
              if summary else f"{last['round']} round(s) so far; the run has not finished (no {SUMMARY_JSON})")
    info = [
        ("run directory", str(run.run_dir)),
        ("rounds", status),
        ("final federated C-index", f"{format_value(last.get('c_index'))} ({format_value(last.get('comparable'), '.0f')} comparable "
                                    f"pairs)"),
        ("final pooled Dice", format_value(last.get("dice"))),
        ("best round by C-index", f"{summary.get('best_round_by_c_index') or 'n/a'} "
                                  f"(C-index {format_value(summary.get('best_c_index'))})"),
        ("sites per round", format_value(last.get("eval_sites"), ".0f")),
        ("preset / seed", f"{config.get('preset', '?')} / {config.get('seed', '?')}"),
        ("model", (run.model_path.name if run.model_path else "no final model yet")
         + (f", {_num(summary.get('model_bytes')) / 1e6:.2f} MB" if summary.get("model_bytes") else "")),
    ]
    parts.append("<h2>Run</h2>\n" + _table(["", ""], info, "run"))
    parts.append('<p class="note">Privacy: this page shows what the coordinator holds: sums of the sites\' '
                 "aggregate counts and each site's own counts (pair counts, Dice sums, numbers of patients), and the "
                 "coordinator's own test patients. No per-patient value of a site.</p>")

    # rounds
    parts.append("<h2>Per round (federated)</h2>")
    parts.append(_img(Path(ROUNDS_PNG),
                      "Federated C-index (pooled pair counts over all sites), pooled Dice and losses per round"))
    head = ["round", "C-index", "comparable pairs", "Dice", "eval loss", "train loss", "patients", "events",
            "sites", "failures (train/eval)", "seconds"]
    body = [[str(r["round"]), format_value(r.get("c_index")), format_value(r.get("comparable"), ".0f"), format_value(r.get("dice")),
             format_value(r.get("eval_loss"), ".4f"), format_value(r.get("train_loss"), ".4f"), format_value(r.get("n_patients"), ".0f"),
             format_value(r.get("n_events"), ".0f"), format_value(r.get("eval_sites"), ".0f"),
             f"{r.get('train_failures', 'n/a')}/{r.get('eval_failures', 'n/a')}", format_value(r.get("round_seconds"), ".1f")]
            for r in rows]
    parts.append(_table(head, body, "rounds"))

    # sites
    parts.append("<h2>Per site</h2>")
    if sites and last_sites is not None:
        parts.append(_img(Path(SITES_PNG), f"Patients and metrics per site, round {last_sites['round']}"))
        head = ["site", "node id", "training patients", "evaluated patients", "events", "comparable pairs",
                "C-index", "Dice", "train loss"]
        body = [[s["label"], s["node"], format_value(s["train_examples"], ".0f"), format_value(s["n_patients"], ".0f"),
                 format_value(s["n_events"], ".0f"), format_value(s["comparable"], ".0f"), format_value(s["c_index"]), format_value(s["dice"]),
                 format_value(s["train_loss"], ".4f")] for s in sites]
        parts.append(_table(head, body, "sites"))
        parts.append('<p class="note">Each site\'s C-index counts only its own comparable pairs; the federated '
                     "C-index pools every site's pair counts (it is not the mean of these). Sites are named after "
                     "their key files where the coordinator wrote sites.json (flower-server), else numbered in "
                     "node-id order; a site sends no name.</p>")
    else:
        parts.append('<p class="note">This run\'s metrics hold no per-site rows (a server older than the '
                     "per_site record); only the pooled numbers above are known.</p>")

    # test set
    parts.append("<h2>Test set (coordinator's held-out patients)</h2>")
    if test is None:
        parts.append('<p class="note">No test set given (strpnet report RUN_DIR --test-cache DIR).</p>')
    else:
        tinfo = [
            ("test cache", str(test.cache_dir)),
            ("patients (events)", f"{test.n_patients} ({test.n_events})"
                                  + (f"; {test.n_excluded} without outcome left out" if test.n_excluded else "")),
            ("C-index", f"{format_value(test.c_index)} ({test.comparable} comparable pairs)"),
            ("Dice (pooled)", format_value(test.dice)),
            ("risk groups", f"high: risk > {test.threshold:.4g} ({test.n_high} patients), low: {test.n_low}"),
            ("cut", test.threshold_source),
            ("log-rank p (high vs low)", "n/a (one group is empty)" if test.logrank_p is None
             else f"{test.logrank_p:.3g}"),
        ]
        parts.append(_table(["", ""], tinfo, "test"))
        parts.append(_img(test.km_png, "Kaplan-Meier curves of the test patients by predicted risk group "
                                       "(lifelines; 95% confidence bands)"))
        if test.overlays:
            parts.append("<h3>Examples</h3>")
            parts += [_img(png, caption) for png, caption in test.overlays]
    parts.append(f'<p class="note">Written by strpnet report in {seconds:.1f} s.</p>\n</body>\n</html>\n')
    return "\n".join(parts)
