"""Checkpoints of a federated run: global weights, round, metrics history and RNG states, written atomically.

``RUN_DIR/checkpoint.npz`` holds one array per weight (``w/<name>``) and ``meta_json`` (round, history, run
config, RNG states of Python's ``random`` — FedAvg's node sampling —, NumPy and torch). It is rewritten after
every round (temp file + rename): an interrupted run always leaves the last complete round.
"""

from __future__ import annotations

import json
import os
import random
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from strpnet_core.fsutil import atomic_path, json_default

CHECKPOINT_NAME = "checkpoint.npz"
CHECKPOINT_FORMAT = 1
_W = "w/"


@dataclass
class Checkpoint:
    """State of a run after a completed round.

    Attributes
    ----------
    server_round:
        Global rounds completed (0 = initial model).
    weights:
        Global weights, name -> array (the model's state_dict order is kept).
    history:
        One dict of metrics per completed round.
    config:
        The run configuration (``FederationConfig.to_dict()``).
    rng:
        ``{"python": ..., "numpy": ..., "torch": ...}`` JSON-serialisable RNG states.
    """

    server_round: int
    weights: dict[str, np.ndarray]
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)


def seed_server_rngs(seed: int, *, secret_numpy: bool = False) -> None:
    """Seed Python's ``random`` and NumPy's global generator at the start of a new run.

    Both from ``seed``, or, with ``secret_numpy`` (a run with differential privacy), NumPy's from 128 bits of fresh
    OS entropy (``secrets.token_bytes``): Flower's DP wrappers draw the Gaussian noise from NumPy's global generator,
    and every site knows the run's ``seed`` (it is in the run config), so noise drawn from it could be recomputed
    and subtracted from the released weights. The checkpoint keeps the generator's state (:func:`capture_rng`, on
    the coordinator only), so a resumed DP run still draws the same noise as an uninterrupted one; two DP runs with
    the same seed differ.
    """
    random.seed(seed)
    if secret_numpy:
        np.random.seed(np.frombuffer(secrets.token_bytes(16), dtype=np.uint32))
    else:
        np.random.seed(seed % 2**32)


def capture_rng() -> dict[str, Any]:
    """The current RNG states of Python's ``random``, NumPy's global generator and torch (CPU), as JSON data."""
    import torch

    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Restore the RNG states captured by :func:`capture_rng`."""
    import torch

    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    if "torch" in state:
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save_checkpoint(run_dir: str | os.PathLike[str], ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``run_dir/checkpoint.npz`` atomically; return the path."""
    path = Path(run_dir) / CHECKPOINT_NAME
    meta = {
        "format": CHECKPOINT_FORMAT,
        "server_round": int(ckpt.server_round),
        "weight_names": list(ckpt.weights),
        "history": ckpt.history,
        "config": ckpt.config,
        "rng": ckpt.rng,
    }
    arrays = {f"{_W}{k}": np.asarray(v) for k, v in ckpt.weights.items()}
    text = json.dumps(meta, default=json_default, allow_nan=True)
    arrays["meta_json"] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return path


def load_checkpoint(run_dir: str | os.PathLike[str]) -> Checkpoint | None:
    """Read ``run_dir/checkpoint.npz``; None when there is none.

    Raises
    ------
    ValueError
        Naming the file when it is unreadable or of another format.
    """
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(bytes(npz["meta_json"]).decode("utf-8"))
            weights = {name: np.array(npz[f"{_W}{name}"]) for name in meta["weight_names"]}
    except Exception as exc:
        raise ValueError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from exc
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')} != {CHECKPOINT_FORMAT}")
    return Checkpoint(
        server_round=int(meta["server_round"]),
        weights=weights,
        history=list(meta.get("history", [])),
        config=dict(meta.get("config", {})),
        rng=dict(meta.get("rng", {})),
    )
