"""Reply checks before aggregation (server/update_checks.py): keys, shapes, dtypes, finiteness, metrics."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from server.update_checks import (
    array_signature,
    check_arrays,
    check_evaluate_reply,
    check_train_reply,
    majority_keys,
)
from strpnet_core.federation import EVAL_COUNT_KEYS


def _global() -> ArrayRecord:
    return ArrayRecord({"conv.w": Array(np.zeros((2, 3), np.float32)), "conv.b": Array(np.zeros(3, np.float32))})


def _train(arrays: dict[str, np.ndarray], **metrics: float) -> RecordDict:
    m = {"num-examples": 4, "train-loss": 0.5, **metrics}
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": MetricRecord(m)})


GOOD = {"conv.w": np.ones((2, 3), np.float32), "conv.b": np.ones(3, np.float32)}


def test_good_reply_passes() -> None:
    assert check_train_reply(_train(GOOD), array_signature(_global())) is None


@pytest.mark.parametrize(
    ("arrays", "reason"),
    [
        ({**GOOD, "conv.w": np.full((2, 3), np.nan, np.float32)}, r"'conv.w' holds 6 non-finite"),
        ({**GOOD, "conv.b": np.array([1.0, np.inf, 0.0], np.float32)}, r"'conv.b' holds 1 non-finite"),
        ({**GOOD, "conv.w": np.ones((3, 2), np.float32)}, r"'conv.w' has shape \(3, 2\).*\(2, 3\)"),
        ({**GOOD, "conv.b": np.ones(3, np.float64)}, r"'conv.b' has dtype float64.*float32"),
        ({"conv.w": GOOD["conv.w"]}, r"missing array\(s\) \['conv.b'\]"),
        ({**GOOD, "extra": np.ones(1, np.float32)}, r"unexpected \['extra'\]"),
    ],
)
def test_bad_arrays_are_named(arrays: dict[str, np.ndarray], reason: str) -> None:
    why = check_train_reply(_train(arrays), array_signature(_global()))
    assert why is not None
    assert re.search(reason, why), why


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({"train-loss": float("nan")}, "'train-loss' is not finite"),
        ({"num-examples": 0}, "num-examples must be > 0"),
        ({"num-examples": -3}, "num-examples must be > 0"),
    ],
)
def test_bad_train_metrics_are_named(metrics: dict[str, float], reason: str) -> None:
    why = check_train_reply(_train(GOOD, **metrics), array_signature(_global()))
    assert why is not None and reason in why


def test_train_reply_without_loss_or_with_two_arrayrecords() -> None:
    rd = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in GOOD.items()}),
                     "metrics": MetricRecord({"num-examples": 3})})
    assert "lack key(s) ['train-loss']" in check_train_reply(rd, array_signature(_global()))
    rd2 = _train(GOOD)
    rd2["more"] = ArrayRecord({"x": Array(np.zeros(1, np.float32))})
    assert "exactly one ArrayRecord, got 2" in check_train_reply(rd2, array_signature(_global()))


def _eval(**over: float) -> RecordDict:
    m = {k: 1.0 for k in EVAL_COUNT_KEYS}
    m.update(concordant=3, discordant=1, tied_risk=1, comparable=5)
    m.update(over)
    m["num-examples"] = 2
    return RecordDict({"metrics": MetricRecord(m)})


def test_evaluate_checks() -> None:
    assert check_evaluate_reply(_eval()) is None
    assert "pair counts do not add up" in check_evaluate_reply(_eval(comparable=50))
    assert "'loss_sum' is not finite" in check_evaluate_reply(_eval(loss_sum=float("inf")))
    assert "'n_events' is negative" in check_evaluate_reply(_eval(n_events=-1))
    no_pairs = RecordDict({"metrics": MetricRecord({"n_patients": 2, "num-examples": 2})})
    assert "lack key(s)" in check_evaluate_reply(no_pairs)


def test_check_arrays_accepts_integer_buffers_without_finiteness_test() -> None:
    ref = {"steps": ((), "int64")}
    assert check_arrays(ArrayRecord({"steps": Array(np.array(7, np.int64))}), ref) is None


def test_majority_keys_is_deterministic() -> None:
    a, b = frozenset({"x", "y"}), frozenset({"x"})
    assert majority_keys([a, b, a]) == a
    assert majority_keys([b, a]) == majority_keys([a, b]) == b  # a tie goes to the first sorted key list: ['x']
    assert majority_keys([]) is None
