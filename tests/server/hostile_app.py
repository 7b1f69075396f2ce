"""A Flower app directory whose ClientApp is the real ``client.app`` with one hostile site (tests only).

:func:`write_hostile_app` writes ``DIR/pyproject.toml`` (the project's, with the ClientApp component pointing at
``hostile_clientapp:app`` and no fab-exclude) and ``DIR/hostile_clientapp.py``: every site trains for real, and the
site of partition ``hostile_partition`` then replaces its weights by NaN (``attack="nan"``) or multiplies them by
``scale`` (``attack="scale"``). The ServerApp is the product's (``server.app:app``, from the editable install).
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_CLIENTAPP = '''"""Hostile twin of client.app (written by tests/server/hostile_app.py)."""
import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.clientapp import ClientApp

import client.app as base

ATTACK = {attack!r}
SCALE = {scale!r}
HOSTILE = {hostile!r}

app = ClientApp(mods=base.CLIENT_MODS)


@app.train(mods=base.TRAIN_MODS)
def train(msg, context):
    reply = base.train(msg, context)
    if int(context.node_config.get("partition-id", -1)) == HOSTILE and not reply.has_error():
        arrays = reply.content["arrays"]
        bad = {{}}
        for key in arrays.keys():
            v = arrays[key].numpy()
            bad[key] = Array(np.full_like(v, np.nan) if ATTACK == "nan" else (v * SCALE).astype(v.dtype))
        reply.content["arrays"] = ArrayRecord(bad)
    return reply


@app.evaluate()
def evaluate(msg, context):
    return base.evaluate(msg, context)
'''


def write_hostile_app(directory: Path, *, attack: str, scale: float = 1e3, hostile_partition: int = 3) -> Path:
    """Write the hostile app into ``directory``; returns it."""
    if attack not in ("nan", "scale"):
        raise ValueError(f"attack must be 'nan' or 'scale', got {attack!r}")
    directory.mkdir(parents=True, exist_ok=True)
    text = (REPO / "pyproject.toml").read_text()
    text = text.replace('clientapp = "client.app:app"', 'clientapp = "hostile_clientapp:app"')
    text = re.sub(r"(?m)^fab-exclude = .*$", "", text)
    (directory / "pyproject.toml").write_text(text)
    (directory / "hostile_clientapp.py").write_text(
        _CLIENTAPP.format(attack=attack, scale=float(scale), hostile=int(hostile_partition)))
    return directory
