"""Privacy audit of every reply a site sends: a Flower client mod with an allow-list, plus the small-count rule.

The ClientApp registers :func:`privacy_audit_mod` first in its mods (``client/app.py``), so it inspects the reply
that actually leaves the site, after every other mod. A reply passes only when it holds

- **train**: one ArrayRecord named like the received global model's whose keys, shapes and dtypes equal the received
  ones (the updated weights) and one MetricRecord ``metrics`` whose keys are in
  :data:`strpnet_core.federation.TRAIN_REPLY_KEYS` (plus Flower's adaptive-clipping ``norm_bit``);
- **evaluate**: one MetricRecord ``metrics`` whose keys are in :data:`strpnet_core.federation.EVAL_REPLY_KEYS`;
  no array;

with numeric scalar values (lists only for :data:`strpnet_core.federation.LIST_REPLY_KEYS`) and no ConfigRecord
(the only record type that carries strings or bytes). Anything else (an extra key such as a per-patient time, an
array of image shape, a string) is *blocked*: the reply is replaced by an error reply naming the offending record and
key, and the block is logged.

Exceptions: Flower 1.42 sends ``str(exception)`` of a failing ClientApp to the coordinator as the error reply's reason,
and an exception's text may name a patient, a file or a loss term. The mod therefore catches every exception of the
handlers: the site's log and audit log keep the full text; what leaves is :class:`SiteError` naming only the site,
the step and the exception's type, unless the exception is one of :data:`REPORTABLE_ERRORS`, whose messages are
written to leave (counts and the site's name only, e.g. :class:`strpnet_core.site.NoUsablePatientError`).

Audit log: when the node config has ``audit-log = "/path/file.jsonl"`` or the environment has
:data:`AUDIT_LOG_ENV`, every reply adds one JSON line there (site-local file): message type, round, verdict, the
records with their key names, array dtypes and shapes (never array contents) and the metric values that were sent
(exactly what the server receives; values of a blocked reply are not written).

Small counts: :func:`suppress_small_evaluation` zeroes the evaluation counts of a split with fewer than
``min-eval-patients`` patients (node config of the site; default :data:`strpnet_core.federation.MIN_EVAL_PATIENTS`),
since the counts of one patient are that patient's event, loss and Dice terms, and the loss and Dice sums when fewer
than that many held-out patients have a recurrence mask.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
from collections.abc import Mapping
from logging import ERROR, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from strpnet_core.federation import (
    EVAL_COUNT_KEYS,
    EVAL_LABELLED_KEYS,
    EVAL_REPLY_KEYS,
    EVAL_SECONDS_KEY,
    LIST_REPLY_KEYS,
    MIN_EVAL_PATIENTS,
    NUM_EXAMPLES_KEY,
    QUERY_REPLY_KEYS,
    TRAIN_CUDA_KEY,
    TRAIN_REPLY_KEYS,
    TRAIN_SUPPRESSED_KEY,
)
from strpnet_core.site import NoUsablePatientError

#: Environment variable naming the audit log (JSON lines); the node config key ``audit-log`` takes precedence.
AUDIT_LOG_ENV = "STRPNET_AUDIT_LOG"
#: Node config key of the audit log.
AUDIT_LOG_NODE_KEY = "audit-log"
#: Node config key of the site's minimum number of evaluation patients.
MIN_EVAL_PATIENTS_NODE_KEY = "min-eval-patients"
#: Name of the MetricRecord of every reply.
METRICS_RECORD = "metrics"
#: Keys Flower's own client mods add to a train reply (adaptive clipping's 0/1 norm bit).
FLOWER_TRAIN_KEYS: tuple[str, ...] = (KEY_NORM_BIT,)
#: Allowed MetricRecord keys per message type.
ALLOWED_METRIC_KEYS: dict[str, frozenset[str]] = {
    MessageType.TRAIN: frozenset((*TRAIN_REPLY_KEYS, *FLOWER_TRAIN_KEYS)),
    MessageType.EVALUATE: frozenset(EVAL_REPLY_KEYS),
    MessageType.QUERY: frozenset(QUERY_REPLY_KEYS),
}
_MAX_NAME = 64  # offending names are cut to this length in error reasons
#: Exceptions whose message may leave the site unchanged: it carries counts and the site's name only.
REPORTABLE_ERRORS: tuple[type[Exception], ...] = (NoUsablePatientError,)


class SiteError(RuntimeError):
    """What the coordinator learns of a site's exception that is not in :data:`REPORTABLE_ERRORS`: the site, the step
    and the exception's type; its message stays in the site's log."""


def _short(name: str) -> str:
    return repr(name if len(name) <= _MAX_NAME else name[:_MAX_NAME] + "...")


def _category(msg: Message) -> str:
    return msg.metadata.message_type.split(".", 1)[0]


def inspect_reply(reply: Message, received: Message) -> list[str]:
    """Check a reply against the privacy allow-list; return the violations (empty: the reply may leave the site).

    Parameters
    ----------
    reply:
        The reply the ClientApp produced (not an error reply).
    received:
        The message it answers (its ArrayRecord is the global model the weights must match).

    Returns
    -------
    list of str
        One sentence per violation, naming the record and key and why it is not allowed.
    """
    kind = _category(received)
    allowed = ALLOWED_METRIC_KEYS.get(kind)
    if allowed is None:
        return [f"{kind!r} replies may carry nothing, got records {sorted(reply.content.keys())}"] \
            if len(reply.content) else []
    out: list[str] = []
    content = reply.content
    for name, rec in content.config_records.items():
        keys = ", ".join(f"{_short(k)} ({type(v).__name__})" for k, v in rec.items())
        out.append(f"ConfigRecord {_short(name)} is not allowed (a reply carries no strings or bytes): keys {keys}")
    out.extend(_check_arrays(kind, content.array_records, received.content.array_records))
    for name, rec in content.metric_records.items():
        if name != METRICS_RECORD:
            out.append(f"MetricRecord {_short(name)} is not allowed (only {METRICS_RECORD!r})")
            continue
        for key, value in rec.items():
            if key not in allowed:
                out.append(f"MetricRecord key {_short(key)} is not an allowed aggregate of a {kind} reply")
            elif isinstance(value, list) and key not in LIST_REPLY_KEYS:
                out.append(f"MetricRecord key {_short(key)} holds a list of {len(value)} values; only a scalar "
                           f"aggregate is allowed")
    return out


def _check_arrays(kind: str, records: Mapping[str, ArrayRecord], received: Mapping[str, ArrayRecord]) -> list[str]:
    if kind != MessageType.TRAIN:
        return [f"ArrayRecord {_short(n)} is not allowed in a {kind} reply (it carries counts only)" for n in records]
    if len(received) != 1:
        return [f"ArrayRecord {_short(n)}: the received message held {len(received)} ArrayRecords, so no reply "
                f"array can be matched to the global model" for n in records]
    (ref_name, ref), = received.items()
    out: list[str] = []
    for name, rec in records.items():
        if name != ref_name:
            out.append(f"ArrayRecord {_short(name)} is not the model's record {ref_name!r}")
            continue
        for key, arr in rec.items():
            if key not in ref:
                out.append(f"array {_short(key)} {tuple(arr.shape)} {arr.dtype} is not a parameter of the received "
                           f"model")
            elif tuple(arr.shape) != tuple(ref[key].shape) or arr.dtype != ref[key].dtype:
                out.append(f"array {_short(key)} is {tuple(arr.shape)} {arr.dtype} but the received parameter is "
                           f"{tuple(ref[key].shape)} {ref[key].dtype}")
        missing = [k for k in ref if k not in rec]
        if missing:
            out.append(f"ArrayRecord {ref_name!r} lacks {len(missing)} parameter(s) of the received model, e.g. "
                       f"{_short(missing[0])}")
    return out


def describe_reply(reply: Message, *, with_values: bool) -> list[dict[str, Any]]:
    """JSON-able description of a reply's records: key names, array dtypes/shapes and (optionally) metric values.

    Array contents and ConfigRecord values are never included.
    """
    out: list[dict[str, Any]] = []
    for name, rec in reply.content.array_records.items():
        out.append({"name": name, "type": "ArrayRecord",
                    "arrays": [{"key": k, "dtype": a.dtype, "shape": list(a.shape)} for k, a in rec.items()]})
    for name, rec in reply.content.metric_records.items():
        if with_values:
            items: Any = {k: v for k, v in rec.items()}
        else:
            items = {k: type(v).__name__ for k, v in rec.items()}
        out.append({"name": name, "type": "MetricRecord", "metrics": items})
    for name, rec in reply.content.config_records.items():
        out.append({"name": name, "type": "ConfigRecord", "keys": {k: type(v).__name__ for k, v in rec.items()}})
    return out


def audit_log_path(context: Context) -> Path | None:
    """The audit log of this site: node config ``audit-log``, else ``$STRPNET_AUDIT_LOG``, else None."""
    value = context.node_config.get(AUDIT_LOG_NODE_KEY) or os.environ.get(AUDIT_LOG_ENV)
    return Path(str(value)).expanduser() if value else None


def append_audit_record(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line to ``path`` under an exclusive lock (sites of one machine may share the file).

    Raises
    ------
    OSError
        When the log cannot be written (named in the message): an audit that was asked for must be complete.
    """
    line = json.dumps(record, sort_keys=True, allow_nan=True) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    except OSError as exc:
        raise OSError(f"privacy audit log {path}: cannot append a record ({exc})") from exc


def _site_label(context: Context) -> str:
    cfg = context.node_config
    if cfg.get("site-name"):
        return str(cfg["site-name"])
    try:  # simulation: partition -> site folder name (label only; the handlers raise real errors)
        from strpnet_core.federation import FederationConfig

        from .site_data import resolve_site

        return resolve_site(cfg, FederationConfig.from_run_config(context.run_config)).site_name
    except (ValueError, OSError, TypeError):
        return f"partition-{cfg['partition-id']}" if "partition-id" in cfg else f"node-{context.node_id}"


def _round_of(msg: Message) -> int | None:
    rec = msg.content.config_records.get("config")
    if rec is None or "server-round" not in rec:
        return None
    return int(rec["server-round"]) + int(rec.get("round-offset", 0))


def outgoing_error(exc: Exception, msg: Message, site: str) -> Exception:
    """The exception that may leave the site for ``exc``: itself when in :data:`REPORTABLE_ERRORS`, else a
    :class:`SiteError` naming the site, the step and the exception's type only."""
    if isinstance(exc, REPORTABLE_ERRORS):
        return exc
    return SiteError(f"site {site}: the {_category(msg)} step raised {type(exc).__name__}; its message stays in the "
                     f"site's log")


def _audit(ctxt: Context, msg: Message, verdict: str, **fields: Any) -> None:
    path = audit_log_path(ctxt)
    if path is None:
        return
    append_audit_record(path, {
        "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds"),
        "run_id": msg.metadata.run_id,
        "node_id": msg.metadata.dst_node_id,
        "site": _site_label(ctxt),
        "message_type": msg.metadata.message_type,
        "round": _round_of(msg),
        "verdict": verdict,
        **fields,
    })


def privacy_audit_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: let a reply leave the site only if it passes :func:`inspect_reply`; log it when asked.

    Parameters
    ----------
    msg, ctxt, call_next:
        Flower's mod signature (``flwr.clientapp.typing.Mod``).

    Returns
    -------
    Message
        The reply unchanged, or an error reply (``MOD_FAILED_PRECONDITION``) naming every violation.

    Raises
    ------
    Exception
        What the handler raised, as :func:`outgoing_error` lets it leave (Flower turns it into the error reply).
    """
    try:
        reply = call_next(msg, ctxt)
    except Exception as exc:
        site = _site_label(ctxt)
        sent = outgoing_error(exc, msg, site)
        log(ERROR, "[strpnet] site %s: the %s step failed", site, _category(msg), exc_info=exc)
        _audit(ctxt, msg, "error", violations=[], records=[],
               error={"type": type(exc).__name__, "message": str(exc), "sent": str(sent)})
        if sent is exc:
            raise
        raise sent from None
    if reply.has_error():
        verdict, violations = "error", []
    else:
        violations = inspect_reply(reply, msg)
        verdict = "blocked" if violations else "allowed"
    extra = {"error": {"code": reply.error.code, "reason": reply.error.reason}} if reply.has_error() else {}
    _audit(ctxt, msg, verdict, violations=violations,
           records=[] if reply.has_error() else describe_reply(reply, with_values=verdict == "allowed"), **extra)
    if verdict != "blocked":
        return reply
    reason = (f"privacy audit blocked the {_category(msg)} reply of site {_site_label(ctxt)}: "
              + "; ".join(violations))
    log(ERROR, "[strpnet] %s", reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def min_eval_patients(node_config: Mapping[str, Any]) -> int:
    """The site's minimum number of evaluation patients (node config ``min-eval-patients``, default
    :data:`strpnet_core.federation.MIN_EVAL_PATIENTS`).

    Raises
    ------
    ValueError
        When the node config value is not an integer >= 1.
    """
    raw = node_config.get(MIN_EVAL_PATIENTS_NODE_KEY, MIN_EVAL_PATIENTS)
    try:
        value = int(raw)
        if isinstance(raw, bool) or value != float(raw) or value < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"node config {MIN_EVAL_PATIENTS_NODE_KEY}: expected an integer >= 1, got {raw!r}") from None
    return value


def suppress_small_training(
    metrics: Mapping[str, float | int], min_patients: int, *, site_name: str = ""
) -> dict[str, float | int]:
    """Zero the training means of a split too small, like :func:`suppress_small_evaluation` for evaluation.

    With ``k = min_patients`` and ``0 < n = num-examples < k``: ``train-loss``, every ``train-<part>`` mean and
    ``train-seconds`` become 0 and ``train-suppressed`` 1 (at ``n = 1`` the means are that patient's own losses: a
    zero Dice/BCE term tells that the patient has no recurrence mask). ``num-examples`` (FedAvg's weight; a count)
    and ``train-cuda`` stay; the server leaves a suppressed site out of the pooled means. The weights still leave:
    against what they reveal, differential privacy is the remedy (docs/reliability.md).

    Returns
    -------
    dict
        A copy of ``metrics``, zeroed where the rule applies.
    """
    out = dict(metrics)
    n = int(out.get(NUM_EXAMPLES_KEY, 0))
    if not 0 < n < min_patients:
        return out
    kept = (NUM_EXAMPLES_KEY, TRAIN_CUDA_KEY, TRAIN_SUPPRESSED_KEY)
    zeroed = [k for k in out if k not in kept]
    for key in zeroed:
        out[key] = 0.0
    out[TRAIN_SUPPRESSED_KEY] = 1.0
    log(WARNING, "[strpnet] site %s: the training split has %d patient(s) < min-eval-patients %d: sending zero for "
        "%s", site_name or "?", n, min_patients, ", ".join(zeroed))
    return out


def suppress_small_evaluation(
    metrics: Mapping[str, float | int], min_patients: int, *, site_name: str = ""
) -> dict[str, float | int]:
    """Zero the evaluation counts that a split too small would let a reader attribute to one patient.

    With ``k = min_patients``, ``n = n_patients`` and ``m = n_labelled`` (patients with a recurrence mask), both
    read from ``metrics``:

    - ``0 < n < k``: every key of :data:`strpnet_core.federation.EVAL_COUNT_KEYS`, ``num-examples`` and
      ``eval-seconds`` becomes 0 (same types), so the site contributes nothing to the pooled metrics (at ``n = 1``,
      ``n_events``, ``loss_sum`` and the Dice sums are that patient's own event, loss and mask sizes, and the compute
      time grows with that patient's number of scans);
    - else ``0 < m < k``: the sums over labelled patients (:data:`strpnet_core.federation.EVAL_LABELLED_KEYS`: Dice
      sums and loss sum) become 0; the pair counts and numbers of patients/events stay.

    Other keys (e.g. the risk-reference histogram, which has its own minimum) are kept.

    Parameters
    ----------
    metrics:
        The evaluation reply content (``local_evaluate``).
    min_patients:
        ``k``; 1 disables the rule.
    site_name:
        For the warning.

    Returns
    -------
    dict
        A copy of ``metrics``, with the counts zeroed where a rule applies.
    """
    out = dict(metrics)
    n = int(out.get("n_patients", 0))
    if 0 < n < min_patients:
        keys: tuple[str, ...] = (*EVAL_COUNT_KEYS, NUM_EXAMPLES_KEY, EVAL_SECONDS_KEY)
        what = f"the evaluation split has {n} patient(s)"
    elif 0 < (n_labelled := int(out.get("n_labelled", 0))) < min_patients:
        keys = EVAL_LABELLED_KEYS
        what = f"{n_labelled} evaluation patient(s) have a recurrence mask"
    else:
        return out
    for key in keys:
        if key in out:
            out[key] = 0.0 if isinstance(out[key], float) else 0
    log(WARNING, "[strpnet] site %s: %s < min-eval-patients %d: sending zero for %s", site_name or "?", what,
        min_patients, ", ".join(keys))
    return out


__all__ = [
    "AUDIT_LOG_ENV",
    "METRICS_RECORD",
    "REPORTABLE_ERRORS",
    "SiteError",
    "append_audit_record",
    "audit_log_path",
    "describe_reply",
    "inspect_reply",
    "min_eval_patients",
    "outgoing_error",
    "privacy_audit_mod",
    "suppress_small_evaluation",
    "suppress_small_training",
]
