"""Checks of the sites' replies before aggregation: pure functions, one reason string per rejected reply.

A train reply is accepted only when it carries

- exactly one ArrayRecord whose keys are those of the global model the server sent, every array with the global
  array's shape and dtype, every value finite (no NaN, no +-inf);
- exactly one MetricRecord holding ``num-examples`` (finite, > 0) and ``train-loss``, every value finite.

An evaluate reply is accepted only when its one MetricRecord holds the evaluation counts
(``strpnet_core.federation.EVAL_COUNT_KEYS``) and ``num-examples``, all finite and >= 0, with
``concordant + discordant + tied_risk == comparable`` (pair counts that cannot come from a real evaluation are refused).

Replies of one round must agree on their metric keys (Flower's aggregation needs identical keys): a reply whose key set
differs from the one most replies share (:func:`majority_keys`) is rejected, naming both sets.

Every function returns ``None`` for an acceptable reply and otherwise a short reason naming the offending key, shape,
dtype or value; the strategy (``server/strategy.py``) logs it with the node id and leaves the reply out.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from strpnet_core.federation import EVAL_COUNT_KEYS, NUM_EXAMPLES_KEY, TRAIN_METRIC_PREFIX

#: Keys every train reply's MetricRecord must hold.
TRAIN_REQUIRED_KEYS: tuple[str, ...] = (NUM_EXAMPLES_KEY, f"{TRAIN_METRIC_PREFIX}loss")
#: Keys every evaluate reply's MetricRecord must hold.
EVAL_REQUIRED_KEYS: tuple[str, ...] = (*EVAL_COUNT_KEYS, NUM_EXAMPLES_KEY)
#: Relative tolerance of the pair-count identity (counts travel as floats).
_PAIR_TOL = 1e-6


def array_signature(arrays: ArrayRecord) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, dtype)}`` of an ArrayRecord (what a reply's arrays must match)."""
    return {k: (tuple(int(d) for d in a.shape), str(a.dtype)) for k, a in arrays.items()}


def check_arrays(arrays: ArrayRecord, reference: Mapping[str, tuple[tuple[int, ...], str]]) -> str | None:
    """Reason why ``arrays`` cannot be averaged with the global model described by ``reference``, or None.

    Parameters
    ----------
    arrays:
        A site's weights.
    reference:
        :func:`array_signature` of the global model sent to the sites.

    Returns
    -------
    str or None
        The first problem found: missing or unexpected keys, a wrong shape or dtype, or non-finite values (with their
        count), else None.
    """
    keys, ref = set(arrays.keys()), set(reference)
    if keys != ref:
        missing, extra = sorted(ref - keys), sorted(keys - ref)
        parts = [f"missing array(s) {_short(missing)}" if missing else "", f"unexpected {_short(extra)}" if extra else ""]
        return "; ".join(p for p in parts if p)
    for key in sorted(ref):
        shape, dtype = reference[key]
        arr = arrays[key]
        got_shape = tuple(int(d) for d in arr.shape)
        if got_shape != shape:
            return f"array {key!r} has shape {got_shape}, the global model's is {shape}"
        if str(arr.dtype) != dtype:
            return f"array {key!r} has dtype {arr.dtype}, the global model's is {dtype}"
    for key in sorted(ref):
        values = arrays[key].numpy()
        if values.dtype.kind in "fc":
            bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            if bad:
                return f"array {key!r} holds {bad} non-finite value(s) (NaN/inf)"
    return None


def check_metrics(metrics: Mapping[str, Any], required: Sequence[str], *, nonnegative: bool = False) -> str | None:
    """Reason why a reply's metrics are unusable (missing required key, non-numeric, non-finite, negative), or None."""
    missing = [k for k in required if k not in metrics]
    if missing:
        return f"metrics lack key(s) {missing} (got {sorted(metrics)}); client and server versions differ?"
    for key in sorted(metrics):
        value = metrics[key]
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return f"metric {key!r} is not a number ({v!r})"
            if not math.isfinite(v):
                return f"metric {key!r} is not finite ({v})"
            if nonnegative and v < 0:
                return f"metric {key!r} is negative ({v})"
    return None


def _one_record(content: RecordDict, kind: str) -> tuple[Any | None, str | None]:
    records = content.array_records if kind == "ArrayRecord" else content.metric_records
    if len(records) != 1:
        return None, f"expected exactly one {kind}, got {len(records)}"
    return next(iter(records.values())), None


def check_train_reply(content: RecordDict, reference: Mapping[str, tuple[tuple[int, ...], str]]) -> str | None:
    """Reason why a train reply must be rejected, or None (see the module docstring for the rules)."""
    arrays, why = _one_record(content, "ArrayRecord")
    if why:
        return why
    metrics, why = _one_record(content, "MetricRecord")
    if why:
        return why
    why = check_metrics(metrics, TRAIN_REQUIRED_KEYS)
    if why:
        return why
    if float(metrics[NUM_EXAMPLES_KEY]) <= 0:
        return f"{NUM_EXAMPLES_KEY} must be > 0, got {metrics[NUM_EXAMPLES_KEY]}"
    return check_arrays(arrays, reference)


def check_evaluate_reply(content: RecordDict) -> str | None:
    """Reason why an evaluate reply must be rejected, or None (see the module docstring for the rules)."""
    metrics, why = _one_record(content, "MetricRecord")
    if why:
        return why
    why = check_metrics(metrics, EVAL_REQUIRED_KEYS, nonnegative=True)
    if why:
        return why
    pairs = float(metrics["concordant"]) + float(metrics["discordant"]) + float(metrics["tied_risk"])
    comparable = float(metrics["comparable"])
    if abs(pairs - comparable) > _PAIR_TOL * max(1.0, comparable):
        return (f"pair counts do not add up: concordant + discordant + tied_risk = {pairs:g} but comparable = "
                f"{comparable:g}")
    return None


def metric_keys(content: RecordDict) -> frozenset[str]:
    """Key set of a reply's (first) MetricRecord (empty when it has none)."""
    for record in content.metric_records.values():
        return frozenset(record.keys())
    return frozenset()


def majority_keys(key_sets: Iterable[frozenset[str]]) -> frozenset[str] | None:
    """The metric key set most replies share; ties go to the set whose sorted keys come first (deterministic).

    Returns None for no reply.
    """
    counts = Counter(key_sets)
    if not counts:
        return None
    return min(counts, key=lambda ks: (-counts[ks], sorted(ks)))


def _short(keys: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)})"
