"""Federated concordance = Harrell's C over the union of within-site pairs; clear errors for malformed replies."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from server.aggregation import (
    ReplyFormatError,
    STRPNetFedAvg,
    evaluate_metrics_aggr_fn,
    train_metrics_aggr_fn,
)
from strpnet_core.federation import EVAL_COUNT_KEYS, pool_eval_counts


def _comparable(time: np.ndarray, event: np.ndarray, i: int, j: int) -> bool:
    """Harrell: i had the event first (t_i < t_j), or at the time j was censored (t_i == t_j, j censored)."""
    return bool(event[i]) and (time[i] < time[j] or (time[i] == time[j] and not event[j]))


def _brute_pairs(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> tuple[int, int, int, int]:
    """O(n^2) reference counts over the comparable pairs (:func:`_comparable`); concordant when risk_i > risk_j."""
    c = d = t = 0
    for i, j in itertools.permutations(range(len(risk)), 2):
        if _comparable(time, event, i, j):
            if risk[i] > risk[j]:
                c += 1
            elif risk[i] < risk[j]:
                d += 1
            else:
                t += 1
    return c, d, t, c + d + t


def _site(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    time = rng.integers(30, 45, n).astype(float)  # integer days in a short span: tied times (event/censored) happen
    event = (rng.random(n) < 0.6).astype(int)
    risk = np.round(-time / 10 + rng.normal(0, 0.8, n), 1)  # rounded: ties in risk happen
    return risk, time, event


def _eval_reply(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> dict[str, float | int]:
    c, d, t, p = _brute_pairs(risk, time, event)
    rng = np.random.default_rng(len(risk))
    inter = int(rng.integers(0, 50))
    return {"concordant": c, "discordant": d, "tied_risk": t, "comparable": p, "dice_intersection": inter,
            "dice_denominator": 2 * inter + int(rng.integers(0, 50)), "loss_sum": float(rng.random() * len(risk)),
            "n_patients": len(risk), "n_events": int(event.sum()), "n_labelled": int(event.sum()),
            "num-examples": len(risk)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pooled_counts_equal_c_of_union_of_within_site_pairs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sites = [_site(rng, n) for n in (7, 12, 4, 9)]
    records = [RecordDict({"metrics": MetricRecord(_eval_reply(*s))}) for s in sites]
    pooled = evaluate_metrics_aggr_fn(records, "num-examples")

    # Reference: enumerate the union of within-site pairs directly (never pairs across sites).
    num = den = 0.0
    for risk, time, event in sites:
        for i, j in itertools.permutations(range(len(risk)), 2):
            if _comparable(time, event, i, j):
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    assert pooled["c-index"] == pytest.approx(num / den, abs=1e-12)
    assert pooled["comparable"] == den
    assert pooled["sites"] == 4
    assert pooled["n_patients"] == sum(len(s[0]) for s in sites)
    inter = sum(r["dice_intersection"] for r in map(lambda s: _eval_reply(*s), sites))
    denom = sum(r["dice_denominator"] for r in map(lambda s: _eval_reply(*s), sites))
    assert pooled["dice"] == pytest.approx(2 * inter / denom)
    replies = [_eval_reply(*s) for s in sites]
    assert pooled["loss"] == pytest.approx(sum(r["loss_sum"] for r in replies) / sum(r["n_labelled"] for r in replies))
    tied = [(t[:, None] == t[None, :]) & (e[:, None] != e[None, :]) for _, t, e in sites]
    assert sum(int(x.sum()) for x in tied) > 0  # the draw has event/censored pairs at the same time


def test_site_counts_agree_with_lifelines_and_core() -> None:
    import lifelines.utils as lifelines
    from strpnet_core.metrics import concordance_counts

    rng = np.random.default_rng(5)
    risk, time, event = _site(rng, 25)
    c, d, t, p = _brute_pairs(risk, time, event)
    core = concordance_counts(risk, time, event)
    assert (core.concordant, core.discordant, core.tied_risk, core.comparable) == (c, d, t, p)
    pooled = pool_eval_counts([_eval_reply(risk, time, event)])
    assert pooled["c-index"] == pytest.approx(lifelines.concordance_index(time, -risk, event), abs=1e-9)


def test_weighted_mean_of_site_c_is_not_the_federated_c() -> None:
    rng = np.random.default_rng(3)
    sites = [_site(rng, n) for n in (5, 15)]
    replies = [_eval_reply(*s) for s in sites]
    pooled = pool_eval_counts(replies)
    site_c = [(r["concordant"] + 0.5 * r["tied_risk"]) / r["comparable"] for r in replies]
    weighted = sum(c * r["n_patients"] for c, r in zip(site_c, replies)) / sum(r["n_patients"] for r in replies)
    assert not math.isclose(pooled["c-index"], weighted, rel_tol=1e-6)


def test_slowest_evaluation_time_is_kept() -> None:
    rng = np.random.default_rng(3)
    replies = [{**_eval_reply(*_site(rng, n)), "eval-seconds": s} for n, s in ((5, 4.0), (8, 9.5), (6, 1.0))]
    assert pool_eval_counts(replies)["eval-seconds-max"] == 9.5
    for r in replies:  # an older site version sends none: no maximum, no error
        del r["eval-seconds"]
    assert "eval-seconds-max" not in pool_eval_counts(replies)


def test_pooled_numbers_do_not_depend_on_the_reply_order() -> None:
    """Float sums in arrival order differ in the last bits between runs (0.1 + 0.2 + 0.3 != 0.3 + 0.2 + 0.1); the
    pooled evaluation counts and training means are exactly rounded sums, the same whatever the order."""
    from strpnet_core.federation import pool_train_metrics

    evals = [{"concordant": 3.0, "discordant": 1.0, "tied_risk": 0.0, "comparable": 4.0, "dice_intersection": 2.0,
              "dice_denominator": 9.0, "loss_sum": x, "n_patients": 3.0, "n_events": 2.0, "n_labelled": 3.0}
             for x in (0.1, 0.2, 0.3, 1e16, -1e16)]
    assert set(evals[0]) == set(EVAL_COUNT_KEYS)
    trains = [{"num-examples": float(n), "train-loss": x} for n, x in ((3, 0.1), (1, 0.2), (7, 1e-17), (2, 0.7))]
    assert 0.1 + 0.2 + 0.3 != 0.3 + 0.2 + 0.1  # what the order changes with a plain sum
    for pool, replies in ((pool_eval_counts, evals), (pool_train_metrics, trains)):
        results = {repr(sorted(pool(list(p)).items())) for p in itertools.permutations(replies)}
        assert len(results) == 1, pool.__name__


def test_no_comparable_pair_gives_nan_not_an_error() -> None:
    reply = {k: 0 for k in EVAL_COUNT_KEYS}
    reply["num-examples"] = 0
    pooled = pool_eval_counts([reply])
    assert math.isnan(pooled["c-index"]) and math.isnan(pooled["loss"])


def test_missing_key_is_a_clear_error() -> None:
    good = _eval_reply(*_site(np.random.default_rng(0), 6))
    bad = dict(good)
    del bad["tied_risk"]
    with pytest.raises(ReplyFormatError, match=r"lacks key\(s\) \['tied_risk'\]"):
        evaluate_metrics_aggr_fn([RecordDict({"m": MetricRecord(good)}), RecordDict({"m": MetricRecord(bad)})],
                                 "num-examples")


def test_mismatched_keys_are_a_clear_error() -> None:
    good = _eval_reply(*_site(np.random.default_rng(0), 6))
    extra = {**good, "per_patient_risk_0": 0.3}
    with pytest.raises(ReplyFormatError, match="mismatched keys"):
        evaluate_metrics_aggr_fn([RecordDict({"m": MetricRecord(good)}), RecordDict({"m": MetricRecord(extra)})],
                                 "num-examples")


def test_train_metrics_are_example_weighted() -> None:
    recs = [RecordDict({"m": MetricRecord({"num-examples": n, "train-loss": l, "train-seconds": s})})
            for n, l, s in ((1, 1.0, 5.0), (3, 2.0, 3.0))]  # the slowest first: its maximum, not the last
    agg = train_metrics_aggr_fn(recs, "num-examples")
    assert agg["train-loss"] == pytest.approx(1.75)
    assert agg["num-examples"] == 4 and agg["train-seconds-max"] == 5.0


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages take their run/node/task ids from Flower's TaskIdentity, set by a running app; set them here."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        if hasattr(TaskIdentity, name):
            monkeypatch.setattr(TaskIdentity, name, value)


def _train_reply(node: int, value: float, n: int) -> Message:
    ins = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    arrays = ArrayRecord({"w": Array(np.full((3, 2), value, dtype=np.float32))})
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n, "train-loss": value})})
    return Message(content=content, reply_to=ins)


def test_fedavg_result_does_not_depend_on_reply_order() -> None:
    values = [(1, 0.1, 3), (2, 0.7, 5), (3, 1e-7, 7), (4, 123.456, 1)]
    results = []
    for perm in itertools.permutations(values):
        strategy = STRPNetFedAvg()
        arrays, metrics = strategy.aggregate_train(1, [_train_reply(*v) for v in perm])
        results.append(arrays["w"].numpy().tobytes())
        assert strategy.last_train_metrics is metrics
    assert len(set(results)) == 1
    expected = sum(v * n for _, v, n in values) / sum(n for *_, n in values)
    assert np.frombuffer(results[0], dtype=np.float32)[0] == pytest.approx(expected, rel=1e-6)


def test_fedavg_train_reply_without_loss_is_rejected_and_the_rest_averaged() -> None:
    ins = Message(content=RecordDict(), dst_node_id=42, message_type="train")
    arrays = ArrayRecord({"w": Array(np.zeros((3, 2), dtype=np.float32))})
    bad = Message(content=RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=ins)
    strategy = STRPNetFedAvg()
    agg, _ = strategy.aggregate_train(1, [_train_reply(1, 0.5, 2), bad])
    assert strategy.last_train_rejected == 1  # server/strategy.py: rejected (logged with node 42), not fatal
    assert agg["w"].numpy()[0, 0] == pytest.approx(0.5)
