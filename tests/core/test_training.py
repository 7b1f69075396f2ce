"""Training loop, evaluation aggregates, model files and ``strpnet train`` on a tiny learnable toy.

The toy: the recurrence map is channel 1's bright blob shifted by one voxel along W; the time to recurrence is
``1000 / s`` with ``s`` the intensity of a blob in channel 3 (so the risk must grow with it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from strpnet_core import cli
from strpnet_core.cache import CachedPatient, cache_path, save_cached_patient
from strpnet_core.dataset import collate_patients
from strpnet_core.metrics import concordance_counts, concordance_index
from strpnet_core.model import ModelConfig, STRPNet
from strpnet_core.training import (
    EVAL_METRIC_KEYS,
    EvalAggregates,
    TrainConfig,
    evaluate_model,
    load_trained_model,
    predict_batch,
    save_trained_model,
    cpu_has_native_bf16,
    select_autocast,
    select_device,
    train_epochs,
    train_step,
    build_loss,
)

S = 8
TINY = ModelConfig(widths=(8, 16), lstm_hidden=8, risk_hidden=8, dropout=0.0)


def _toy_arrays(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:S, :S, :S]

    def ball(c: np.ndarray) -> np.ndarray:
        return ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= 2.5

    out = []
    for i in range(n):
        t = int(rng.integers(1, 4))
        images = rng.normal(0, 0.3, (t, 4, S, S, S)).astype(np.float32)
        blob = ball(rng.integers(2, S - 3, 3))
        images[:, 1][:, blob] += 2.0
        s = float(rng.uniform(0.3, 3.0))
        images[:, 3][:, ball(rng.integers(2, S - 3, 3))] += s
        event = int(rng.random() < 0.8)
        days = np.sort(rng.uniform(0, 300, t)).astype(np.float32)
        days[0] = 0.0
        out.append(dict(pid=f"P{i:03d}", images=images, days=days, event=event, time=1000.0 / s,
                        recurrence=np.roll(blob, 1, axis=2).astype(np.uint8) if event else None))
    return out


def _item(a: dict) -> dict:
    t = a["images"].shape[0]
    rec = a["recurrence"] if a["recurrence"] is not None else np.zeros((S, S, S), np.uint8)
    return {
        "images": torch.from_numpy(a["images"]), "days": torch.from_numpy(a["days"]),
        "time_mask": torch.ones(t, dtype=torch.bool), "recurrence": torch.from_numpy(rec.astype(np.float32))[None],
        "has_label": a["recurrence"] is not None, "brain_mask": torch.ones(1, S, S, S),
        "event": torch.tensor(float(a["event"])), "time": torch.tensor(float(a["time"])), "patient_id": a["pid"],
    }


def toy_dataset(n: int, seed: int = 0) -> list[dict]:
    return [_item(a) for a in _toy_arrays(n, seed)]


def _model(cfg: ModelConfig = TINY, seed: int = 0) -> STRPNet:
    torch.manual_seed(seed)
    return STRPNet(cfg)


def _fit(cfg: TrainConfig, n: int = 24) -> tuple[list[float], EvalAggregates, float]:
    data = toy_dataset(n)
    model = _model()
    result = train_epochs(model, data, cfg, seed=0)
    agg = evaluate_model(model, data, cfg)
    _, risk = predict_batch(model, collate_patients(data), cfg)
    c = concordance_index(risk.numpy(), [float(d["time"]) for d in data], [float(d["event"]) for d in data])
    return result.epoch_losses, agg, c


# ----------------------------------------------------------------------------------------------------------------------
def test_training_learns_the_toy_map_and_ranks_risks() -> None:
    # Batch-only Cox (risk_memory=0) with batches of 8; the next test trains the ranking through the memory.
    cfg = TrainConfig(lr=1e-2, local_epochs=30, batch_size=8, precision="fp32", risk_memory=0,
                      num_threads=1)
    losses, agg, c = _fit(cfg)
    assert losses[-1] < 0.5 * losses[0]
    assert c > 0.8
    assert agg.c_index == pytest.approx(c)
    assert agg.dice > 0.7


@pytest.mark.slow
@pytest.mark.parametrize("memory", [32, 0])
def test_training_with_risk_set_memory_ranks_risks(memory: int) -> None:
    """Batches of one patient: a batch-only Cox loss has no pair to compare (zero gradient, risks stay tied), so
    the ranking is learned through the risk-set memory or not at all."""
    cfg = TrainConfig(lr=3e-3, local_epochs=30, batch_size=1, precision="fp32", risk_memory=memory,
                      num_threads=1)
    _, _, c = _fit(cfg)
    if memory:
        assert c > 0.8
    else:
        assert c == pytest.approx(0.5, abs=0.1)


def test_same_seed_same_weights_and_caller_rng_untouched() -> None:
    cfg = TrainConfig(lr=1e-2, local_epochs=2, batch_size=2, precision="bf16", risk_memory=4,
                      num_threads=1)  # bf16 autocast on CPU (what "auto" picks on a CPU with native bf16)
    data = toy_dataset(6, seed=1)
    dropout_cfg = ModelConfig(widths=(4, 8), lstm_hidden=4, risk_hidden=4, dropout=0.3)
    weights = []
    for seed in (5, 5, 6):
        model = _model(dropout_cfg, seed=0)
        torch.manual_seed(123)
        before = torch.rand(1)
        torch.manual_seed(123)
        train_epochs(model, data, cfg, seed=seed)
        assert torch.equal(torch.rand(1), before)  # the global RNG stream is not consumed
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_evaluate_aggregates_add_up_over_halves() -> None:
    data = toy_dataset(10, seed=2)
    model = _model(ModelConfig(widths=(4, 8), lstm_hidden=4, risk_hidden=4))
    cfg1 = TrainConfig(batch_size=1, precision="fp32", num_threads=1)
    cfg3 = TrainConfig(batch_size=3, precision="fp32", num_threads=1)
    kept: list[float] = []
    whole = evaluate_model(model, data, cfg3, risks_out=kept)
    h1, h2 = evaluate_model(model, data[:5], cfg1), evaluate_model(model, data[5:], cfg3)
    total = h1 + h2
    for key in ("dice_intersection", "dice_denominator", "n_patients", "n_events"):
        assert getattr(total, key) == getattr(whole, key), key
    assert total.loss_sum == pytest.approx(whole.loss_sum, rel=1e-5)
    assert whole.n_patients == 10 and whole.n_events == sum(int(d["event"]) for d in data)
    # concordance: whole = pairs over all patients; the sum = within-half pairs (what the federation pools)
    _, risk = predict_batch(model, collate_patients(data), cfg1)
    times = np.array([float(d["time"]) for d in data])
    events = np.array([float(d["event"]) for d in data])
    r = risk.numpy()
    assert whole.concordance == concordance_counts(r, times, events)
    np.testing.assert_allclose(kept, r, rtol=1e-6, atol=1e-7)  # risks_out: the same risks, in dataset order
    assert total.concordance == concordance_counts(r[:5], times[:5], events[:5]) + concordance_counts(
        r[5:], times[5:], events[5:])
    # batch size does not change the result (padding invariance, per-patient loss)
    same = evaluate_model(model, data, cfg1)
    assert same.concordance == whole.concordance and same.dice_intersection == whole.dice_intersection
    assert same.loss_sum == pytest.approx(whole.loss_sum, rel=1e-5)


def test_eval_metrics_keys_are_fixed_and_round_trip() -> None:
    from strpnet_core.federation import EVAL_COUNT_KEYS

    agg = EvalAggregates(3, 1, 1, 5, 7, 20, 2.5, 4, 2, 2)
    m = agg.to_metrics()
    assert tuple(m) == EVAL_METRIC_KEYS == EVAL_COUNT_KEYS
    assert all(isinstance(v, int) for k, v in m.items() if k != "loss_sum")
    assert EvalAggregates.from_metrics({**m, "num-examples": 4}) == agg
    assert agg.c_index == pytest.approx(3.5 / 5) and agg.dice == pytest.approx(0.7) and agg.mean_loss == 1.25
    assert (agg + EvalAggregates()) == agg
    with pytest.raises(ValueError, match="comparable"):
        EvalAggregates.from_metrics({k: v for k, v in m.items() if k != "comparable"})
    assert evaluate_model(_model(), [], TrainConfig()) == EvalAggregates()


def test_train_config_round_trip_and_validation() -> None:
    cfg = TrainConfig(lr=0.01, num_threads=0, w_cox=2)
    assert cfg.num_threads is None and isinstance(cfg.w_cox, float)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown key"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    for bad in ({"lr": 0}, {"batch_size": 0}, {"ties": "exact"}, {"precision": "fp8"}, {"device": "tpu"},
                {"w_dice": -1}, {"local_epochs": 1.5}, {"risk_memory": -1}, {"num_threads": -2}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="all 0"):
        TrainConfig(w_dice=0, w_bce=0, w_cox=0)


def test_device_and_precision_selection() -> None:
    cpu = torch.device("cpu")
    assert select_device("cpu") == cpu
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            select_device("cuda")
    with pytest.raises(ValueError, match="spec"):
        select_device("gpu")
    native = (True, torch.bfloat16) if cpu_has_native_bf16() else (False, torch.float32)
    assert select_autocast(cpu, "auto") == native
    assert select_autocast(cpu, "bf16") == (True, torch.bfloat16)
    assert select_autocast(cpu, "fp32") == (False, torch.float32)
    with pytest.raises(ValueError, match="fp16"):
        select_autocast(cpu, "fp16")
    with pytest.raises(ValueError, match="precision"):
        select_autocast(cpu, "half")


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [
    (False, False, (False, torch.float32)), (True, False, (True, torch.bfloat16)), (False, True, (True, torch.bfloat16)),
])
def test_auto_precision_on_cpu_follows_native_bf16(monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool,
                                                   expected: tuple[bool, torch.dtype]) -> None:
    """bf16 autocast only where the CPU has bf16 in hardware: emulated bf16 is several times slower than fp32."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert cpu_has_native_bf16() == (avx512_bf16 or amx)
    assert select_autocast(torch.device("cpu"), "auto") == expected
    assert select_autocast(torch.device("cpu"), "bf16") == (True, torch.bfloat16)


def test_train_step_reports_parts_and_changes_weights() -> None:
    model = _model(ModelConfig(widths=(4, 8), lstm_hidden=4, risk_hidden=4))
    batch = collate_patients(toy_dataset(3, seed=3))
    cfg = TrainConfig(risk_memory=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    parts = train_step(model, batch, build_loss(cfg), opt, device=torch.device("cpu"),
                       autocast=select_autocast(torch.device("cpu"), "auto"), grad_clip=1.0)
    assert {"dice", "bce", "cox", "total", "grad_norm"} <= set(parts)
    assert np.isfinite(parts["total"]) and parts["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_a_non_finite_gradient_is_not_applied(grad_clip: float) -> None:
    """A finite loss whose gradient is NaN (here forced by a hook) raises instead of corrupting the weights."""
    model = _model(ModelConfig(widths=(4, 8), lstm_hidden=4, risk_hidden=4))
    batch = collate_patients(toy_dataset(3, seed=3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = next(model.parameters())
    first.register_hook(lambda g: g * float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn = build_loss(TrainConfig(risk_memory=8))
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        train_step(model, batch, loss_fn, opt, device=torch.device("cpu"),
                   autocast=(False, torch.float32), grad_clip=grad_clip)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(loss_fn.memory) == 0  # the rejected step's risks did not stay in the Cox risk-set memory


def test_non_finite_outputs_are_a_floating_point_error_and_leave_the_risk_memory_alone() -> None:
    """Diverged weights (here a NaN in the risk head) gave a ValueError that read like bad input data ("risk_scores
    contains NaN"), after the risk-set memory had taken the batch."""
    model = _model(ModelConfig(widths=(4, 8), lstm_hidden=4, risk_hidden=4))
    with torch.no_grad():
        model.risk_head.beta.fill_(float("nan"))
    loss_fn = build_loss(TrainConfig(risk_memory=8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(FloatingPointError, match="outputs are not finite"):
        train_step(model, collate_patients(toy_dataset(3, seed=3)), loss_fn, opt, device=torch.device("cpu"),
                   autocast=(False, torch.float32))
    assert len(loss_fn.memory) == 0


def test_model_file_round_trip(tmp_path: Path) -> None:
    model = _model(ModelConfig(widths=(4, 8), lstm_hidden=4)).eval()
    cfg = TrainConfig(lr=0.02)
    path = save_trained_model(tmp_path / "m.pt", model, cfg, info={"epochs": 3})
    loaded, cfg2, payload = load_trained_model(path)
    assert cfg2 == cfg and payload["info"] == {"epochs": 3} and loaded.cfg == model.cfg
    batch = collate_patients(toy_dataset(2, seed=4))
    torch.testing.assert_close(predict_batch(loaded, batch, TrainConfig(precision="fp32")),
                               predict_batch(model, batch, TrainConfig(precision="fp32")))
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.pt"):
        load_trained_model(tmp_path / "bad.pt")
    torch.save({k: v for k, v in payload.items() if k != "state_dict"}, tmp_path / "nostate.pt")
    with pytest.raises(ValueError, match="nostate.pt: KeyError"):
        load_trained_model(tmp_path / "nostate.pt")
    other = _model(ModelConfig(widths=(4, 8), lstm_hidden=6)).state_dict()  # weights of another architecture
    torch.save({**payload, "state_dict": other}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: RuntimeError"):
        load_trained_model(tmp_path / "other.pt")


def _write_site(folder: Path, n: int, seed: int, preset: str = "ci") -> None:
    for a in _toy_arrays(n, seed):
        t = a["images"].shape[0]
        save_cached_patient(cache_path(folder, a["pid"]), CachedPatient(
            patient_id=a["pid"], site=folder.name, images=a["images"], days=a["days"],
            timepoints=[f"{i:03d}" for i in range(t)], brain_mask=np.ones((S, S, S), np.uint8),
            recurrence=a["recurrence"], event=a["event"], time=a["time"], meta={"preset": preset}))


def test_train_command_pooled_with_validation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_site(tmp_path / "a", 3, seed=5)
    _write_site(tmp_path / "b", 3, seed=6)
    _write_site(tmp_path / "val", 4, seed=7)
    run = tmp_path / "run"
    argv = ["train", "--cache", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(run), "--epochs", "2",
            "--model-widths", "4", "8", "--lstm-hidden", "4", "--val-cache", str(tmp_path / "val"),
            "--no-progress", "--precision", "fp32", "--seed", "3", "--num-threads", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "on 6 patients from 2 cache folder(s), validating on 4" in out
    assert "val C" in out and "saved" in out
    model, cfg, payload = load_trained_model(run / "final_model.pt")
    assert model.cfg.widths == (4, 8) and cfg.local_epochs == 2 and cfg.seed == 3
    rows = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["val_n_patients"] == 4 and np.isfinite(r["train_loss"]) for r in rows)
    assert json.loads((run / "model_config.json").read_text())["model_config"]["widths"] == [4, 8]
    # what `strpnet predict` needs from any folder: the preset and the caches' absolute paths
    assert payload["info"]["preset"] == "ci"
    assert payload["info"]["train_cache"] == [str((tmp_path / "a").resolve()), str((tmp_path / "b").resolve())]
    assert cli.main(argv) == 2  # refuses to overwrite without --force
    assert "exists" in capsys.readouterr().err
    _write_site(tmp_path / "demo", 2, seed=8, preset="demo")
    assert cli.main([*argv[:3], str(tmp_path / "demo"), *argv[3:], "--force"]) == 2
    assert "different presets" in capsys.readouterr().err
