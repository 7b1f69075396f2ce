"""Outputs of a federated run in its run directory (all written atomically).

=========================  ==========================================================================================
``final_model.pt``         ``torch.save`` of ``{"state_dict", "model_config", "train_config", "server_round",
                           "format": "strpnet-fed-model/1"}`` (load with :func:`load_final_model`)
``model_config.json``      the ``ModelConfig`` (and the ``TrainConfig``) as JSON
``metrics.csv``            one row per round: federated C-index, Dice, losses, pooled counts, times, bytes
``metrics.json``           the same rows as a JSON list
``summary.json``           the run: config, rounds, final metrics, best round, wall time, privacy note
``checkpoint.npz``         the resume point (``server/checkpoint.py``)
=========================  ==========================================================================================
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from strpnet_core.fsutil import atomic_path, atomic_write_json, atomic_write_text

MODEL_FORMAT = "strpnet-fed-model/1"
FINAL_MODEL = "final_model.pt"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
SUMMARY_JSON = "summary.json"
MODEL_CONFIG_JSON = "model_config.json"


def _clean(value: Any) -> Any:
    """NaN/inf -> None for JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_metrics(run_dir: str | os.PathLike[str], history: Sequence[Mapping[str, Any]]) -> None:
    """Write ``metrics.csv`` and ``metrics.json`` (one row per round, ``round`` first, other columns sorted).

    Nested values (the ``per_site`` list of per-site aggregate counts) go to ``metrics.json`` only.
    """
    run_dir = Path(run_dir)
    keys = sorted({k for row in history for k, v in row.items() if not isinstance(v, list | dict)} - {"round"})
    columns = ["round", *keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _fmt(row.get(k)) for k in columns})
    atomic_write_text(run_dir / METRICS_CSV, buf.getvalue())
    atomic_write_json(run_dir / METRICS_JSON, _clean([dict(r) for r in history]))


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return v


def write_final_model(
    run_dir: str | os.PathLike[str],
    state_dict: Mapping[str, Any],
    model_config: Mapping[str, Any],
    train_config: Mapping[str, Any],
    server_round: int,
) -> Path:
    """Write ``final_model.pt`` (weights + configs) and ``model_config.json``; return the model path."""
    import torch

    run_dir = Path(run_dir)
    payload = {
        "format": MODEL_FORMAT,
        "state_dict": {k: torch.as_tensor(v).clone() for k, v in state_dict.items()},
        "model_config": dict(model_config),
        "train_config": dict(train_config),
        "server_round": int(server_round),
    }
    path = run_dir / FINAL_MODEL
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    atomic_write_json(run_dir / MODEL_CONFIG_JSON,
                      {"model_config": dict(model_config), "train_config": dict(train_config)})
    return path


def load_final_model(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``final_model.pt``: ``{"state_dict", "model_config", "train_config", "server_round", "format"}``.

    Build the model with ``STRPNet(ModelConfig.from_dict(d["model_config"])).load_state_dict(d["state_dict"])``.
    """
    import torch

    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not a {MODEL_FORMAT} file")
    return payload


def write_summary(run_dir: str | os.PathLike[str], summary: Mapping[str, Any]) -> None:
    """Write ``summary.json`` (NaN written as null)."""
    atomic_write_json(Path(run_dir) / SUMMARY_JSON, _clean(dict(summary)))
