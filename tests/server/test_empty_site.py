"""A site with no usable patient: its ClientApp raises a clear error holding counts and the site name only, Flower
turns it into an error reply, and the federation goes on with the other sites (a real Flower simulation of 3 sites:
two with caches, one whose raw folder holds only defective scans).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message_type import MessageType

from strpnet_core.console import free_port, stop_process
from strpnet_core.federation import FederationConfig, build_model, prepare_site_cache
from strpnet_core.preprocessing.pipeline import REPORT_NAME
from strpnet_core.site import NoUsablePatientError
from sim_fixtures import TINY_RUN_CONFIG

BAD_PATIENTS = ("HOSP3-0001", "HOSP3-0002", "HOSP3-0003")


def make_corrupt_site(site: Path) -> Path:
    """A raw site whose 3 patients all have defective pre-op scans (garbage, truncated, empty files)."""
    rng = np.random.default_rng(0)
    for i, pid in enumerate(BAD_PATIENTS):
        folder = site / f"{pid}-000"
        folder.mkdir(parents=True)
        for m in ("t1n", "t1c", "t2w", "t2f"):
            data = [rng.integers(0, 256, 800, dtype=np.uint8).tobytes(), b"\x1f\x8b\x08\x00" + b"\x00" * 20, b""][i]
            (folder / f"{pid}-000-{m}.nii.gz").write_bytes(data)
    (site / "scan_dates.csv").write_text("patient_id,timepoint,day\n" + "".join(f"{p},000,0\n" for p in BAD_PATIENTS))
    (site / "outcomes.csv").write_text("patient_id,event,time_days\n" + "".join(f"{p},0,300\n" for p in BAD_PATIENTS))
    return site


def _flower_reason(exc: BaseException) -> str:
    """The error reason Flower 1.42 puts in a ClientApp's error reply (flwr/supernode/runtime/run_clientapp.py and
    flwr/server/superlink/fleet/vce/vce_api.py)."""
    return str(type(exc)) + ":<'" + str(exc) + "'>"


def test_clientapp_error_reason_holds_counts_and_site_name_only(tmp_path: Path) -> None:
    from client.app import app

    data = tmp_path / "data"
    make_corrupt_site(data / "site-03")
    cfg_values = {**TINY_RUN_CONFIG, "preset": "ci", "data-root": str(data), "cache-root": str(tmp_path / "cache")}
    cfg = FederationConfig.from_run_config(cfg_values)
    context = Context(run_id=1, node_id=3, node_config={"partition-id": 0, "num-partitions": 1}, state=RecordDict(),
                      run_config=cfg_values)
    content = RecordDict({"arrays": ArrayRecord(build_model(cfg).state_dict()),
                          "config": ConfigRecord({"server-round": 1})})
    meta = Metadata(run_id=1, message_id="m-1", src_node_id=1, dst_node_id=3, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=3600.0, message_type=MessageType.TRAIN)
    msg = Message(metadata=meta, content=content)
    with pytest.raises(NoUsablePatientError) as info:
        app(msg, context)
    reason = _flower_reason(info.value)
    report = tmp_path / "cache" / "site-03" / REPORT_NAME
    assert str(info.value) == f"site site-03: no usable patient: 3 rejected, see {report}"
    assert not any(p in reason for p in BAD_PATIENTS) and "nii" not in reason
    # the site keeps the details (file and reason per case) in its own report
    text = report.read_text()
    assert all(f"{p}-000-t1n.nii.gz" in text for p in BAD_PATIENTS)


@pytest.mark.integration
def test_federation_goes_on_without_a_site_that_has_no_usable_patient(site_caches: Path, tmp_path: Path) -> None:
    from server.launch import app_dir, flwr_run_stream, start_superlink, write_flwr_config, write_run_config

    data, cache = tmp_path / "data", tmp_path / "cache"
    for name in ("site-01", "site-02"):  # ready caches; their raw folders are never read (the cache is marked ready)
        shutil.copytree(site_caches / name, cache / name)
        prepare_site_cache(None, cache / name, site_name=name, preset="ci")
        (data / name).mkdir(parents=True)
    make_corrupt_site(data / "site-03")

    run_dir, flwr_home = tmp_path / "run", tmp_path / "flower"
    port = free_port()
    write_flwr_config(flwr_home, f"127.0.0.1:{port}", insecure=True)
    values = {**TINY_RUN_CONFIG, "num-server-rounds": 2, "seed": 3, "preset": "ci", "data-root": str(data),
              "cache-root": str(cache), "run-dir": str(run_dir), "min-available-nodes": 3, "min-train-nodes": 2,
              "min-evaluate-nodes": 2}
    config_file = write_run_config(flwr_home / "run_config.toml", values)
    superlink = start_superlink(flwr_home, host="127.0.0.1", port=port, tls=None, simulation=True,
                                database=flwr_home / "state.db")
    try:
        outcome = flwr_run_stream(app_dir(), flwr_home, run_config_file=config_file,
                                  federation_config={"num-supernodes": 3, "client-resources-num-cpus": 1},
                                  timeout_s=300, on_line=lambda line: None)
    finally:
        stop_process(superlink)
    log = "\n".join(outcome.lines)
    (tmp_path / "flwr_stream.log").write_text(log)
    assert outcome.returncode == 0, log[-4000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:  # the run's metrics show the site missing: 2 sites aggregated, 1 error reply per step
        assert r["train_sites"] == 2 and r["eval_sites"] == 2, r
        assert r["train_failures"] == 1 and r["eval_failures"] == 1, r
    # What reached the coordinator (the server logs each error reply's reason): the site name and the counts, no
    # patient id. In simulation Ray wraps the reason with its traceback (code lines only), so a reason is the block
    # of lines from the server's log record to the next log record.
    blocks = _reason_blocks(outcome.lines)
    assert len(blocks) == 4, log[-4000:]  # train and evaluate, 2 rounds
    for block in blocks:
        assert re.search(r"site site-03: no usable patient: 3 rejected, see \S+preprocess_report\.json", block), block
        assert not any(p in block for p in BAD_PATIENTS), block


_RECORD = re.compile(r"^(\x1b\[\d+m)?(DEBUG|INFO|WARNING|ERROR)\b")
# Ray forwards each actor's own output to the driver's terminal as "(ClientAppActor pid=N) ..." lines: that is the
# simulated site's local log (its rejection table names patients, as a site's own log may), printed whenever Ray
# flushes it, so it can land between a server record and its continuation lines. It is no part of a reply's reason.
_RAY_FORWARDED = re.compile(r"^(\x1b\[\d+m)?\((\w+ )?pid=\d+")


def _reason_blocks(lines: list[str]) -> list[str]:
    """The server's log records of error replies, each with its continuation lines (Ray-forwarded site output
    excluded)."""
    blocks: list[list[str]] = []
    inside = False
    for line in lines:
        if _RAY_FORWARDED.match(line):
            continue
        if _RECORD.match(line):
            inside = "sent an error instead of" in line
            if inside:
                blocks.append([])
        if inside:
            blocks[-1].append(line)
    return ["\n".join(b) for b in blocks]
