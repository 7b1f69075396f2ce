"""``strpnet report``: a real federated simulation (3 sites, 2 rounds, tiny model) and a held-out test site of the
coordinator -> report.html with its tables and images; errors on a missing or corrupt run directory; the page
rendered by headless Chromium (skipped where no Chromium binary exists)."""

from __future__ import annotations

import dataclasses
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sim_fixtures import TINY_RUN_CONFIG, make_site_caches
from strpnet_core.cli import main as cli_main
from strpnet_core.report import (
    KM_PNG,
    REPORT_HTML,
    ROUNDS_PNG,
    SITES_JSON,
    SITES_PNG,
    ReportError,
    load_run,
    risk_threshold,
    site_table,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real Flower simulation: 3 sites of 9 patients (5 train, 4 held out each, so every site sends a risk
    histogram), 2 rounds; and a test site of 10 patients that no site saw (another seed): the run's ``test-cache``,
    evaluated server-side after every round and, by default, by the report."""
    from strpnet_core.commands.simulate import simulate

    root = tmp_path_factory.mktemp("report")
    caches = make_site_caches(root / "caches", sites=3, patients=9, seed=0)
    test_cache = make_site_caches(root / "test", sites=1, patients=10, seed=11) / "site-01"
    run_dir = root / "run"
    simulate(run_dir, data=None, cache=caches, sites=3, rounds=2, preset="ci", seed=7,
             overrides={**TINY_RUN_CONFIG, "test-cache": str(test_cache)}, timeout_s=400, progress=False)
    return {"run": run_dir, "test": test_cache, "root": root}


@pytest.fixture(scope="module")
def report(sim: dict[str, Path]):
    return write_report(sim["run"], out_dir=sim["root"] / "report", device="cpu")  # the run's own test-cache


@pytest.mark.integration
def test_report_holds_round_site_and_test_tables_and_images(sim: dict[str, Path], report) -> None:
    page = report.html.read_text(encoding="utf-8")
    rows = json.loads((sim["run"] / "metrics.json").read_text())
    assert report.html == sim["root"] / "report" / REPORT_HTML
    # one table row per round, with the federated C-index of metrics.json
    rounds_table = re.search(r'<table class="rounds">(.*?)</table>', page, re.S).group(1)
    assert rounds_table.count("<tr>") == len(rows) + 1
    for r in rows:
        assert f"<td>{r['round']}</td><td>{r['c_index']:.3f}</td>" in rounds_table
    # per-site rows: the sites' own counts add up to the pooled ones
    sites = site_table(rows[-1])
    assert len(sites) == 3
    assert sum(s["n_patients"] for s in sites) == rows[-1]["n_patients"]
    assert sum(s["comparable"] for s in sites) == rows[-1]["comparable"]
    sites_table = re.search(r'<table class="sites">(.*?)</table>', page, re.S).group(1)
    assert sites_table.count("<tr>") == 4 and "site 3" in sites_table
    # every linked image exists beside the page and is a PNG; the expected ones are all there
    links = re.findall(r'<img src="([^"]+)"', page)
    assert {ROUNDS_PNG, SITES_PNG, KM_PNG, "overlay-1.png", "overlay-2.png", "overlay-3.png"} <= set(links)
    for name in links:
        assert "/" not in name  # relative, beside the page
        assert (report.html.parent / name).read_bytes()[:8] == PNG_MAGIC, name
    t = report.test
    assert t.n_patients == 10 and t.n_high + t.n_low == 10 and t.n_high > 0 and t.n_low > 0
    assert t.logrank_p is not None and 0.0 <= t.logrank_p <= 1.0
    assert "log-rank p" in page and html.escape(f"{t.c_index:.3f}") in page


@pytest.mark.integration
def test_test_set_c_index_and_log_rank_match_lifelines(sim: dict[str, Path], report) -> None:
    """Recompute the test set's risks patient by patient and compare with lifelines; the server-side evaluation of
    the last round (same weights) gave the same C-index."""
    from lifelines.statistics import logrank_test
    from lifelines.utils import concordance_index

    from strpnet_core.cache import list_cache, load_cached_patient
    from strpnet_core.dataset import collate_patients, patient_to_item
    from strpnet_core.training import load_trained_model, predict_batch

    model, cfg, _ = load_trained_model(sim["run"] / "final_model.pt")
    cfg = dataclasses.replace(cfg, device="cpu")
    risks, times, events = [], [], []
    for f in list_cache(sim["test"]):
        p = load_cached_patient(f)
        risks.append(float(predict_batch(model, collate_patients([patient_to_item(p)]), cfg)[1][0]))
        times.append(p.time)
        events.append(p.event)
    r, t, e = np.array(risks), np.array(times), np.array(events)
    assert report.test.c_index == pytest.approx(concordance_index(t, -r, e), abs=1e-9)
    last = json.loads((sim["run"] / "metrics.json").read_text())[-1]
    assert last["test_n_patients"] == 10 and last["test_c_index"] == pytest.approx(report.test.c_index, abs=1e-9)
    high = r > report.test.threshold
    assert int(high.sum()) == report.test.n_high
    assert report.test.logrank_p == pytest.approx(logrank_test(t[high], t[~high], e[high], e[~high]).p_value)


@pytest.mark.integration
def test_run_without_per_site_rows_says_so(sim: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "old-run"
    run.mkdir()
    rows = json.loads((sim["run"] / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "per_site"} for r in rows]))
    res = write_report(run)
    page = res.html.read_text()
    assert res.html == run / "report" / REPORT_HTML
    assert "no per-site rows" in page and "has not finished" in page and 'class="sites"' not in page
    assert not (run / "report" / SITES_PNG).exists()
    with pytest.raises(ReportError, match="final_model.pt"):
        write_report(run, test_cache=sim["test"])


def test_site_table_orders_nodes_by_number_and_has_no_dice_without_labelled_patients() -> None:
    counts = {"concordant": 1, "discordant": 0, "tied_risk": 0, "comparable": 1, "n_patients": 2, "n_events": 1}
    row = {"per_site": [{"node": 10, **counts, "dice_intersection": 3, "dice_denominator": 12},
                        {"node": 9, **counts, "dice_intersection": 0, "dice_denominator": 0}]}
    sites = site_table(row)
    assert [s["node"] for s in sites] == ["9", "10"]  # numeric, not "10" < "9"
    assert [s["label"] for s in sites] == ["site 1", "site 2"]
    assert np.isnan(sites[0]["dice"]) and sites[1]["dice"] == pytest.approx(0.5)  # no labelled patient: no Dice
    named = site_table(row, {"10": "hospital-a"})  # flower-server's sites.json; a node it does not name: numbered
    assert [s["label"] for s in named] == ["site 1", "hospital-a"]


@pytest.mark.integration
def test_deployment_site_names_label_the_per_site_rows(sim: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "deployed-run"
    run.mkdir()
    rows = json.loads((sim["run"] / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps(rows))
    nodes = sorted({str(s["node"]) for s in rows[-1]["per_site"]}, key=int)
    (run / SITES_JSON).write_text(json.dumps({"site_names": {n: f"hospital-{i}" for i, n in enumerate(nodes)}}))
    page = write_report(run).html.read_text()
    assert all(f"<td>hospital-{i}</td>" in page for i in range(len(nodes)))
    for bad in (json.dumps({"site_names": ["not", "a", "mapping"]}), "{cut"):  # labels only: numbered instead
        (run / SITES_JSON).write_text(bad)
        page = write_report(run).html.read_text()
        assert "hospital-0" not in page and "<td>site 1</td>" in page


def test_risk_groups_cut_at_the_training_reference_median(tmp_path: Path) -> None:
    from strpnet_core.risk_reference import RISK_HIST_KEYS, histogram_edges, write_risk_reference

    counts = np.zeros(len(RISK_HIST_KEYS))
    edges = histogram_edges()
    k = int(np.searchsorted(edges, 1.0, side="right"))  # the bin [1.0, 1.5)
    counts[k] = 10.0
    ref = tmp_path / "risk_reference.json"
    write_risk_reference(ref, counts)
    m, source = risk_threshold(np.array([-3.0, 7.0]), ref)
    assert m == pytest.approx(1.25) and "training sites" in source  # mid-bin: uniform mass inside the bin
    m, source = risk_threshold(np.array([-3.0, 0.0, 7.0]), tmp_path / "absent.json")
    assert m == 0.0 and "test patients" in source
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ReportError, match="bad.json"):
        risk_threshold(np.array([0.0]), tmp_path / "bad.json")


def test_missing_or_corrupt_run_dir_gives_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ReportError, match="not a directory"):
        load_run(tmp_path / "nope")
    with pytest.raises(ReportError, match="no metrics.json"):
        load_run(tmp_path)
    (tmp_path / "metrics.json").write_text('[{"round": 1, "c_index": 0.7')  # truncated
    with pytest.raises(ReportError, match=r"metrics\.json: unreadable.*corrupt"):
        load_run(tmp_path)
    (tmp_path / "metrics.json").write_text("[]")
    with pytest.raises(ReportError, match="empty list"):
        load_run(tmp_path)
    (tmp_path / "metrics.json").write_text('[{"epoch": 1, "train_loss": 1.2}]')  # what `strpnet train` writes
    with pytest.raises(ReportError, match="a `strpnet train` run"):
        load_run(tmp_path)
    (tmp_path / "metrics.json").write_text('[{"round": 1, "c_index": "high"}]')
    with pytest.raises(ReportError, match="round 1: c_index = 'high' is not a number"):
        load_run(tmp_path)
    (tmp_path / "metrics.json").write_text('[{"round": 1, "c_index": 0.6}]')
    (tmp_path / "summary.json").write_bytes(b"\x00\x01")
    with pytest.raises(ReportError, match="summary.json: unreadable"):
        load_run(tmp_path)
    assert cli_main(["report", str(tmp_path / "nope")]) == 2
    assert "strpnet report: error:" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.integration
def test_report_renders_in_headless_chromium(report, tmp_path: Path) -> None:
    """Chromium loads the page and its images (relative links): the screenshot shows the plots' colours."""
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium binary on PATH (Debian: apt-get install chromium); the rendering check needs one")
    from matplotlib.image import imread

    shot = tmp_path / "report.png"
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2400",
           report.html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.is_file(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    img = imread(shot)[..., :3]
    assert img.shape[:2] == (2400, 1280)
    nonwhite = (img < 0.95).any(axis=-1).mean()
    assert nonwhite > 0.08, f"the page looks blank ({nonwhite:.1%} non-white pixels)"
    # matplotlib's tab:blue (31, 119, 180) is drawn by the C-index line, the site bars and the KM curve: an error
    # page or a page whose images failed to load has none of it.
    blue = (np.abs(img - np.array([31, 119, 180]) / 255.0) < 0.04).all(axis=-1).sum()
    assert blue > 500, f"only {blue} tab:blue pixels: the plots did not render"
