"""Checkpoint round trip (weights bit-exact, history, RNG states) and run outputs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from server.checkpoint import Checkpoint, capture_rng, load_checkpoint, restore_rng, save_checkpoint, seed_server_rngs
from server.outputs import load_final_model, write_final_model, write_metrics, write_summary


def test_checkpoint_round_trip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = {"enc.0.weight": rng.normal(size=(4, 3, 3)).astype(np.float32), "n.num_batches": np.array(7)}
    history = [{"round": 1, "c_index": 0.61, "dice": float("nan")}]
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    state = capture_rng()
    save_checkpoint(tmp_path, Checkpoint(1, weights, history, {"seed": 0}, state))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.server_round == 1 and ckpt.config == {"seed": 0}
    assert list(ckpt.weights) == list(weights)
    for k in weights:
        assert ckpt.weights[k].dtype == weights[k].dtype and ckpt.weights[k].tobytes() == weights[k].tobytes()
    assert ckpt.history[0]["round"] == 1 and np.isnan(ckpt.history[0]["dice"])
    restore_rng(ckpt.rng)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_dp_noise_is_not_drawn_from_the_public_seed() -> None:
    """Flower's DP wrappers add noise from NumPy's global generator; every site knows the run's seed, so a DP run
    seeds that generator from secret entropy (Python's ``random`` keeps the seed); a resume restores it."""
    from flwr.supercore.differential_privacy import add_gaussian_noise_inplace

    def noise() -> np.ndarray:
        arrays = [np.zeros(64, dtype=np.float64)]
        add_gaussian_noise_inplace(arrays, 1.0)
        return arrays[0]

    seed_server_rngs(7)
    public = (random.random(), noise())
    seed_server_rngs(7)
    assert random.random() == public[0] and np.array_equal(noise(), public[1])  # without DP: the seed's draws
    draws = []
    for _ in range(2):
        seed_server_rngs(7, secret_numpy=True)
        draws.append((random.random(), noise()))
    assert draws[0][0] == draws[1][0] == public[0]
    assert not np.array_equal(draws[0][1], public[1]) and not np.array_equal(draws[0][1], draws[1][1])
    state = capture_rng()  # the checkpoint's copy: a resumed DP run draws the noise the uninterrupted one would
    expected = noise()
    seed_server_rngs(7)
    restore_rng(state)
    assert np.array_equal(noise(), expected)


def test_no_checkpoint_and_corrupt_checkpoint(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None
    (tmp_path / "checkpoint.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="unreadable checkpoint"):
        load_checkpoint(tmp_path)


def test_outputs(tmp_path: Path) -> None:
    history = [{"round": 1, "c_index": 0.5, "dice": float("nan")}, {"round": 2, "c_index": 0.7, "dice": 0.1}]
    write_metrics(tmp_path, history)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "round,c_index,dice" and lines[1] == "1,0.5,nan"
    assert json.loads((tmp_path / "metrics.json").read_text())[0]["dice"] is None
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    path = write_final_model(tmp_path, sd, {"width": 4}, {"lr": 0.1}, server_round=2)
    loaded = load_final_model(path)
    assert torch.equal(loaded["state_dict"]["w"], sd["w"]) and loaded["model_config"] == {"width": 4}
    write_summary(tmp_path, {"best": float("nan")})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"best": None}
