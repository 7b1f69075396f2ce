"""Privacy audit of a site's replies (client/audit.py).

Unit: the mod passes an honest train/evaluate reply unchanged and blocks (error reply naming the key, logged without
the value) a reply with an extra per-patient key, an image-shaped array, a string, a list, a reshaped parameter, an
array in an evaluate reply; the small-count rule zeroes a one-patient evaluation.

Integration: a real Flower simulation (3 ci sites, one with a single evaluation patient, 2 rounds) with the audit log
on: every reply of every site held only the model's arrays and allow-listed aggregates, and no value sent equals a
per-patient time, risk score (final model) or evaluation loss of any site.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from client.audit import (
    AUDIT_LOG_ENV,
    SiteError,
    inspect_reply,
    min_eval_patients,
    privacy_audit_mod,
    suppress_small_evaluation,
    suppress_small_training,
)
from strpnet_core.federation import (
    EVAL_COUNT_KEYS,
    EVAL_LABELLED_KEYS,
    EVAL_REPLY_KEYS,
    NUM_EXAMPLES_KEY,
    TRAIN_REPLY_KEYS,
    FederationConfig,
    build_model,
    load_site_dataset,
    pool_train_metrics,
    site_splits,
    train_metrics,
)
from strpnet_core.site import NoUsablePatientError
from strpnet_core.training import EvalAggregates
from sim_fixtures import TINY_RUN_CONFIG, make_site_caches

REPO = Path(__file__).resolve().parents[2]

SEED = 11


def _cfg() -> FederationConfig:
    return FederationConfig.from_run_config({**TINY_RUN_CONFIG, "seed": SEED, "preset": "ci"})


# ----------------------------------------------------------------------------------------------------------------------
# unit: the mod on constructed messages
# ----------------------------------------------------------------------------------------------------------------------


def _received(kind: str, arrays: ArrayRecord) -> Message:
    meta = Metadata(run_id=1, message_id="m-1", src_node_id=1, dst_node_id=7, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=3600.0, message_type=kind)
    return Message(metadata=meta, content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}))


def _context(tmp_path: Path) -> Context:
    return Context(run_id=1, node_id=7, node_config={"site-name": "site-x", "audit-log": str(tmp_path / "a.jsonl")},
                   state=RecordDict(), run_config={})


def _run_mod(tmp_path: Path, kind: str, make_reply: Callable[[Message], RecordDict]) -> tuple[Message, Message]:
    model = build_model(_cfg())
    received = _received(kind, ArrayRecord(model.state_dict()))
    replies: list[Message] = []

    def call_next(msg: Message, ctxt: Context) -> Message:
        replies.append(Message(content=make_reply(msg), reply_to=msg))
        return replies[-1]

    out = privacy_audit_mod(received, _context(tmp_path), call_next)
    return out, replies[0]


def _honest_train(msg: Message) -> RecordDict:
    sd = msg.content["arrays"].to_torch_state_dict()
    new = {k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()}
    metrics = train_metrics(4, 1.25, {"dice": 0.5, "bce": 0.25, "cox": 0.5}, seconds=2.0)
    return RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord(metrics)})


def _honest_eval(msg: Message) -> RecordDict:
    counts = {**EvalAggregates(concordant=3, comparable=4, tied_risk=0, loss_sum=2.5, n_patients=3,
                                n_events=2).to_metrics(), NUM_EXAMPLES_KEY: 3}
    return RecordDict({"metrics": MetricRecord(counts)})


def _log_lines(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]


def test_honest_replies_pass_unchanged_and_are_logged(tmp_path: Path) -> None:
    out, reply = _run_mod(tmp_path, "train", _honest_train)
    assert out is reply and not out.has_error()
    out, reply = _run_mod(tmp_path, "evaluate", _honest_eval)
    assert out is reply and not out.has_error()
    train_line, eval_line = _log_lines(tmp_path)
    assert train_line["verdict"] == eval_line["verdict"] == "allowed"
    assert train_line["site"] == "site-x" and train_line["round"] == 1
    arrays = train_line["records"][0]
    assert arrays["type"] == "ArrayRecord" and arrays["name"] == "arrays"
    assert all(set(a) == {"key", "dtype", "shape"} for a in arrays["arrays"])  # no array content
    assert eval_line["records"] == [{"name": "metrics", "type": "MetricRecord",
                                     "metrics": dict(reply.content["metrics"])}]


def _with_metric(key: str, value: Any) -> Callable[[Message], RecordDict]:
    def make(msg: Message) -> RecordDict:
        content = _honest_train(msg) if msg.metadata.message_type == "train" else _honest_eval(msg)
        content["metrics"][key] = value
        return content
    return make


def _with_array(key: str, shape: tuple[int, ...]) -> Callable[[Message], RecordDict]:
    def make(msg: Message) -> RecordDict:
        content = _honest_train(msg)
        content["arrays"][key] = Array(np.zeros(shape, np.float32))
        return content
    return make


def _with_string(msg: Message) -> RecordDict:
    content = _honest_eval(msg)
    content["notes"] = ConfigRecord({"patient": "S01-003 recurred at day 412"})
    return content


def _eval_with_array(msg: Message) -> RecordDict:
    content = _honest_eval(msg)
    content["arrays"] = ArrayRecord({"risk": Array(np.array([0.3, -1.2], np.float32))})
    return content


def _reshaped(msg: Message) -> RecordDict:
    content = _honest_train(msg)
    first = next(iter(content["arrays"].keys()))
    content["arrays"][first] = Array(np.zeros((2, 2, 2, 2), np.float32))
    return content


@pytest.mark.parametrize(
    ("kind", "make_reply", "named"),
    [
        ("evaluate", _with_metric("time_S01-003", 523.4), "time_S01-003"),
        ("train", _with_metric("risk-p0", -0.731), "risk-p0"),
        ("evaluate", _with_metric("loss_sum", [0.61, 0.93]), "loss_sum"),
        ("train", _with_array("t1c_image", (4, 16, 16, 16)), "t1c_image"),
        ("train", _reshaped, "is (2, 2, 2, 2) float32"),
        ("evaluate", _with_string, "notes"),
        ("evaluate", _eval_with_array, "arrays"),
    ],
    ids=["per-patient-key", "train-extra-key", "list-value", "image-array", "reshaped", "string", "eval-array"],
)
def test_the_mod_blocks_what_is_not_allow_listed(tmp_path: Path, kind: str, make_reply: Callable[[Message], RecordDict],
                                                 named: str) -> None:
    out, reply = _run_mod(tmp_path, kind, make_reply)
    assert out.has_error() and not reply.has_error()
    assert out.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert "privacy audit blocked" in out.error.reason and named in out.error.reason
    assert out.metadata.reply_to_message_id == "m-1"
    (line,) = _log_lines(tmp_path)
    assert line["verdict"] == "blocked" and line["violations"]
    text = (tmp_path / "a.jsonl").read_text()
    for secret in ("523.4", "0.731", "0.93", "recurred at day"):
        assert secret not in text  # a blocked reply's values never reach the log either


def _raising(exc: Exception) -> Callable[[Message, Context], Message]:
    def call_next(msg: Message, ctxt: Context) -> Message:
        raise exc
    return call_next


def _flower_reason(exc: BaseException) -> str:
    """The error reason Flower 1.42 sends for a ClientApp's exception (flwr/supernode/runtime/run_clientapp.py)."""
    return str(type(exc)) + ":<'" + str(exc) + "'>"


def test_an_exception_leaves_the_site_as_its_type_only(tmp_path: Path) -> None:
    secret = FloatingPointError("non-finite loss on batch SYN01-0003: {'cox': nan, 'n_events': 1.0}")
    received = _received("train", ArrayRecord(build_model(_cfg()).state_dict()))
    with pytest.raises(SiteError) as info:
        privacy_audit_mod(received, _context(tmp_path), _raising(secret))
    reason = _flower_reason(info.value)
    assert "site site-x" in reason and "train step" in reason and "FloatingPointError" in reason
    assert "SYN01-0003" not in reason and "n_events" not in reason and info.value.__cause__ is None
    (line,) = _log_lines(tmp_path)  # the site keeps the full text in its own audit log
    assert line["verdict"] == "error" and line["error"]["type"] == "FloatingPointError"
    assert line["error"]["message"] == str(secret) and line["error"]["sent"] == str(info.value)

    # an exception written to leave (counts and the site's name only) passes unchanged
    empty = NoUsablePatientError("site-x", 3, tmp_path / "report.json")
    with pytest.raises(NoUsablePatientError) as info2:
        privacy_audit_mod(received, _context(tmp_path), _raising(empty))
    assert info2.value is empty and _log_lines(tmp_path)[-1]["error"]["sent"] == str(empty)


def test_the_sampling_key_query_passes_the_audit_and_reads_no_data(tmp_path: Path) -> None:
    from client.app import query_sampling_key
    from strpnet_core.federation import SAMPLING_KEY, SAMPLING_QUERY, sampling_key

    ctx = Context(run_id=1, node_id=7, node_config={"site-name": "site-x", "cache-dir": str(tmp_path / "cache"),
                                                     "audit-log": str(tmp_path / "a.jsonl")},
                  state=RecordDict(), run_config={**TINY_RUN_CONFIG, "seed": SEED, "preset": "ci"})
    out = privacy_audit_mod(_received(f"query.{SAMPLING_QUERY}", ArrayRecord()), ctx, query_sampling_key)
    assert not out.has_error()
    assert dict(out.content["metrics"]) == {SAMPLING_KEY: sampling_key(SEED, "site-x")}
    assert not (tmp_path / "cache").exists()  # no cache prepared, no patient read
    assert _log_lines(tmp_path)[-1]["verdict"] == "allowed"


def test_allow_lists_cover_what_the_core_sends() -> None:
    assert set(train_metrics(1, 0.0, {"dice": 0, "bce": 0, "cox": 0})) <= set(TRAIN_REPLY_KEYS)
    assert set(EvalAggregates().to_metrics()) | {NUM_EXAMPLES_KEY} <= set(EVAL_REPLY_KEYS)
    assert not inspect_reply(Message(content=_honest_eval(_received("evaluate", ArrayRecord())),
                                     reply_to=_received("evaluate", ArrayRecord())),
                             _received("evaluate", ArrayRecord()))


def test_risk_histogram_groups_honour_the_sites_own_minimum(tmp_path: Path) -> None:
    """A site whose min-eval-patients is above RISK_HIST_MIN_PATIENTS gets risk-histogram groups of that size too:
    8 patients, val-fraction 0.4 -> 5 training patients: sent with the default minimum (5), zeros with 6."""
    from strpnet_core.federation import RISK_HIST_KEYS, RISK_HIST_MIN_PATIENTS, local_evaluate

    make_site_caches(tmp_path, sites=1, patients=8)
    cfg, cache = _cfg(), tmp_path / "site-01"
    train, _ = site_splits(load_site_dataset(cache), cfg, "site-01")
    assert len(train) == RISK_HIST_MIN_PATIENTS
    weights = build_model(cfg).state_dict()
    sent = {k: local_evaluate(weights, cache, cfg, site_name="site-01", min_patients=k) for k in (2, 6)}
    assert sum(sent[2][key] for key in RISK_HIST_KEYS) == pytest.approx(RISK_HIST_MIN_PATIENTS)
    assert all(sent[6][key] == 0 for key in RISK_HIST_KEYS)
    assert sent[6]["n_patients"] == sent[2]["n_patients"] == 3  # the evaluation counts do not depend on it


def test_small_evaluation_split_sends_zero_counts() -> None:
    one = {**EvalAggregates(loss_sum=0.83, n_patients=1, n_events=1, dice_intersection=40,
                            dice_denominator=95, n_labelled=1).to_metrics(), NUM_EXAMPLES_KEY: 1, "risk_hist_05": 7,
           "eval-seconds": 2.5}
    out = suppress_small_evaluation(one, 2)
    assert all(out[k] == 0 for k in (*EVAL_COUNT_KEYS, NUM_EXAMPLES_KEY, "eval-seconds"))
    assert isinstance(out["loss_sum"], float) and isinstance(out["n_patients"], int)
    assert out["risk_hist_05"] == 7  # not derived from the evaluation split
    assert suppress_small_evaluation(one, 1) == one
    two = {**one, "n_patients": 2, "n_labelled": 2}
    assert suppress_small_evaluation(two, 2) == two
    one_labelled = suppress_small_evaluation({**two, "n_labelled": 1}, 2)
    assert all(one_labelled[k] == 0 for k in EVAL_LABELLED_KEYS)
    assert one_labelled["n_patients"] == 2 and one_labelled["n_events"] == 1
    assert min_eval_patients({}) == 2 and min_eval_patients({"min-eval-patients": 5}) == 5
    for bad in (0, "x", 1.5, True):
        with pytest.raises(ValueError, match="min-eval-patients"):
            min_eval_patients({"min-eval-patients": bad})


def test_small_training_split_sends_zero_means_and_the_server_leaves_it_out() -> None:
    one = train_metrics(1, 1.7, {"dice": 0.0, "bce": 0.0, "cox": 0.0}, seconds=3.0, cuda=True)  # no mask: dice 0
    out = suppress_small_training(one, 2)
    assert out[NUM_EXAMPLES_KEY] == 1 and out["train-cuda"] == 1.0 and out["train-suppressed"] == 1.0
    assert all(out[k] == 0 for k in ("train-loss", "train-dice", "train-bce", "train-cox", "train-seconds"))
    assert suppress_small_training(one, 1) == one
    three = train_metrics(3, 0.9, {"dice": 0.4, "bce": 0.2, "cox": 0.3}, seconds=9.0)
    assert suppress_small_training(three, 2) == three and three["train-suppressed"] == 0.0
    pooled = pool_train_metrics([out, three])
    assert pooled[NUM_EXAMPLES_KEY] == 4 and pooled["train-suppressed"] == 1
    assert pooled["train-loss"] == pytest.approx(0.9) and pooled["train-dice"] == pytest.approx(0.4)
    assert pooled["train-cuda"] == pytest.approx(0.25)  # 1 of the 4 training patients went through a GPU
    alone = pool_train_metrics([out])
    assert math.isnan(alone["train-loss"]) and alone["train-cuda"] == 1.0


# ----------------------------------------------------------------------------------------------------------------------
# integration: every reply of a real simulation
# ----------------------------------------------------------------------------------------------------------------------


def _per_patient_values(cache_root: Path, final_state: dict[str, torch.Tensor]) -> dict[str, dict[str, list[float]]]:
    """Per site: every patient's time and risk score (final model), and each held-out patient's evaluation loss."""
    from torch.utils.data import Subset

    from strpnet_core.dataset import collate_patients
    from strpnet_core.training import evaluate_model, predict_batch

    cfg = _cfg()
    model = build_model(cfg)
    model.load_state_dict(final_state)
    train_cfg = cfg.train_config()
    out: dict[str, dict[str, list[float]]] = {}
    for site_dir in sorted(p for p in cache_root.iterdir() if p.is_dir()):
        ds = load_site_dataset(site_dir)
        items = [ds[i] for i in range(len(ds))]
        _, risk = predict_batch(model, collate_patients(items), train_cfg)
        _, val = site_splits(ds, cfg, site_dir.name)
        losses = [evaluate_model(model, Subset(ds, [i]), train_cfg).loss_sum for i in val.indices]
        unsuppressed = evaluate_model(model, val, train_cfg)  # what the site would send without the rule
        out[site_dir.name] = {"time": [float(it["time"]) for it in items], "risk": risk.double().tolist(),
                              "loss": losses, "unsuppressed_loss_sum": [unsuppressed.loss_sum]}
    return out


@pytest.mark.integration
def test_every_reply_of_a_simulation_holds_only_weights_and_aggregates(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from strpnet_core.commands.simulate import simulate

    caches = make_site_caches(tmp_path / "caches", sites=2, patients=6, seed=3)
    small = make_site_caches(tmp_path / "small", sites=3, patients=3, seed=5)
    shutil.move(small / "site-03", caches / "site-03")  # a site with 3 patients: 1 held out -> suppressed
    # (seeds 3/5 and SEED: site-01 and site-02 hold out 2 patients, 1 of them with a recurrence mask; site-03 holds
    # out 1 patient, with a mask)
    audit_log = tmp_path / "audit.jsonl"
    monkeypatch.setenv(AUDIT_LOG_ENV, str(audit_log))
    run_dir = tmp_path / "run"
    rounds = 2
    simulate(run_dir, data=None, cache=caches, sites=3, rounds=rounds, preset="ci", seed=SEED,
             overrides=dict(TINY_RUN_CONFIG), timeout_s=300, progress=False)

    final = torch.load(run_dir / "final_model.pt", weights_only=True)["state_dict"]
    model_arrays = sorted((k, str(v.numpy().dtype), list(v.shape)) for k, v in final.items())
    lines = [json.loads(x) for x in audit_log.read_text().splitlines()]
    seen = sorted((r["site"], r["message_type"], r["round"]) for r in lines)
    assert seen == sorted((s, t, r) for s in ("site-01", "site-02", "site-03") for t in ("train", "evaluate")
                          for r in range(1, rounds + 1)), "one audit line per reply of every site and round"
    sent: list[tuple[str, str, str, float]] = []  # (site, type, key, value) of every number that left a site
    for r in lines:
        assert r["verdict"] == "allowed", r["violations"]
        kinds = sorted(rec["type"] for rec in r["records"])
        metrics = next(rec["metrics"] for rec in r["records"] if rec["type"] == "MetricRecord")
        if r["message_type"] == "train":
            assert kinds == ["ArrayRecord", "MetricRecord"]
            arrays = next(rec["arrays"] for rec in r["records"] if rec["type"] == "ArrayRecord")
            assert sorted((a["key"], a["dtype"], a["shape"]) for a in arrays) == model_arrays
            assert set(metrics) == set(TRAIN_REPLY_KEYS)
        else:
            assert kinds == ["MetricRecord"]
            assert set(metrics) <= set(EVAL_REPLY_KEYS) and set(EVAL_COUNT_KEYS) <= set(metrics)
        for key, value in metrics.items():
            assert isinstance(value, int | float), f"{r['site']} {key}: {value!r} is not a scalar aggregate"
            sent.append((r["site"], r["message_type"], key, float(value)))

    # the small-count rule: site-03 (1 held-out patient) sends zeros; site-01/02 (2 held out, 1 labelled) send
    # their pair counts and numbers of patients but zero loss and Dice sums
    evals = {(r["site"], r["round"]): next(rec["metrics"] for rec in r["records"]) for r in lines
             if r["message_type"] == "evaluate"}
    for rnd in range(1, rounds + 1):
        assert all(evals[("site-03", rnd)][k] == 0 for k in (*EVAL_COUNT_KEYS, NUM_EXAMPLES_KEY))
        for site in ("site-01", "site-02"):
            assert evals[(site, rnd)]["n_patients"] == 2 and evals[(site, rnd)]["comparable"] >= 0
            assert all(evals[(site, rnd)][k] == 0 for k in EVAL_LABELLED_KEYS)
    pooled = json.loads((run_dir / "metrics.json").read_text())
    assert [row["n_patients"] for row in pooled] == [4] * rounds

    # no number that left a site equals a per-patient time, risk score or evaluation loss of any site
    values = _per_patient_values(caches, final)
    # the control: without the rule, site-03's and site-01's loss sums would be one patient's loss
    for site in ("site-03", "site-01"):
        assert any(p > 0 and math.isclose(values[site]["unsuppressed_loss_sum"][0], p, rel_tol=1e-9)
                   for p in values[site]["loss"])
    n_compared = 0
    for site, per in values.items():
        for what in ("time", "risk", "loss"):
            for p in (x for x in per[what] if x != 0):  # 0: the loss of a patient without mask (not a value)
                for s, t, key, v in sent:
                    n_compared += 1
                    assert not math.isclose(v, p, rel_tol=1e-5, abs_tol=0.0), (
                        f"{s} sent {t} {key} = {v}, equal to a per-patient {what} of {site} ({p})")
    assert n_compared > 1000
