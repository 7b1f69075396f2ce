"""Tests of strpnet_core.losses against independent implementations (lifelines, scikit-survival, MONAI, torch)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lifelines import CoxPHFitter
from lifelines.datasets import load_rossi
from survival_data import gbsg2_frame
from monai.losses import DiceLoss
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.util import Surv

from strpnet_core.losses import (
    LossOutput,
    MultiTaskLoss,
    RiskSetMemory,
    cox_partial_likelihood_loss,
    dice_loss,
    weighted_bce,
)


# --------------------------------------------------------------------------------------------------------------
# independent references
# --------------------------------------------------------------------------------------------------------------
def naive_cox_nll_sum(eta: np.ndarray, t: np.ndarray, e: np.ndarray, ties: str) -> float:
    """Textbook negative log partial likelihood with a loop over distinct event times."""
    total = 0.0
    for tk in np.unique(t[e == 1]):
        dk = (t == tk) & (e == 1)
        rk = t >= tk
        s = np.exp(eta[rk]).sum()
        d = int(dk.sum())
        if ties == "breslow":
            total += d * math.log(s)
        else:
            ek = np.exp(eta[dk]).sum()
            total += sum(math.log(s - (j / d) * ek) for j in range(d))
        total -= eta[dk].sum()
    return total

def newton_fit(x: np.ndarray, time: np.ndarray, event: np.ndarray, ties: str) -> np.ndarray:
    """Minimise our summed loss for a linear predictor by Newton's method (float64, standardised covariates)."""
    mu, sd = x.mean(0), x.std(0)
    z = torch.tensor((x - mu) / sd)
    t = torch.tensor(time, dtype=torch.float64)
    e = torch.tensor(event, dtype=torch.float64)

    def f(b: torch.Tensor) -> torch.Tensor:
        return cox_partial_likelihood_loss(z @ b, t, e, ties=ties, reduction="sum")

    beta = torch.zeros(z.shape[1], dtype=torch.float64)
    for _ in range(50):
        b = beta.clone().requires_grad_(True)
        grad = torch.autograd.grad(f(b), b)[0]
        step = torch.linalg.solve(torch.autograd.functional.hessian(f, beta), grad)
        beta = beta - step
        if float(step.abs().max()) < 1e-12:
            break
    else:  # pragma: no cover - would be a failure
        raise AssertionError("Newton did not converge")
    return beta.numpy() / sd


# --------------------------------------------------------------------------------------------------------------
# Cox loss
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_cox_matches_naive_reference_with_ties(ties: str) -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(2, 30))
        eta = rng.normal(scale=2.0, size=n)
        t = rng.integers(0, 6, n).astype(float)  # many tied times
        e = rng.integers(0, 2, n).astype(float)
        if e.sum() == 0:
            e[0] = 1
        ref = naive_cox_nll_sum(eta, t, e, ties)
        got_sum = cox_partial_likelihood_loss(torch.tensor(eta), t, e, ties=ties, reduction="sum")
        got_mean = cox_partial_likelihood_loss(torch.tensor(eta), torch.tensor(t), torch.tensor(e), ties=ties)
        assert float(got_sum) == pytest.approx(ref, rel=1e-12, abs=1e-10)
        assert float(got_mean) == pytest.approx(ref / e.sum(), rel=1e-12, abs=1e-10)


def test_efron_equals_breslow_without_ties_and_differs_with() -> None:
    rng = np.random.default_rng(2)
    eta = torch.tensor(rng.normal(size=12))
    t = torch.arange(12, dtype=torch.float64)
    e = torch.tensor(rng.integers(0, 2, 12), dtype=torch.float64)
    e[0] = 1
    a = cox_partial_likelihood_loss(eta, t, e, ties="efron")
    b = cox_partial_likelihood_loss(eta, t, e, ties="breslow")
    assert float(a) == pytest.approx(float(b), rel=1e-14)
    t_tied = torch.zeros(12, dtype=torch.float64)
    e_all = torch.ones(12, dtype=torch.float64)
    assert float(cox_partial_likelihood_loss(eta, t_tied, e_all, ties="efron")) < float(
        cox_partial_likelihood_loss(eta, t_tied, e_all, ties="breslow")
    )


def test_cox_loss_value_equals_lifelines_log_likelihood() -> None:
    rossi = load_rossi()
    cph = CoxPHFitter().fit(rossi, "week", "arrest")
    x = rossi.drop(columns=["week", "arrest"]).to_numpy(float)
    eta = torch.tensor(x @ cph.params_.to_numpy())
    loss = cox_partial_likelihood_loss(eta, rossi.week.to_numpy(float), rossi.arrest.to_numpy(float), reduction="sum")
    assert float(loss) == pytest.approx(-cph.log_likelihood_, rel=1e-9)


def test_cox_fit_matches_lifelines_efron_on_rossi_and_gbsg2() -> None:
    rossi = load_rossi()
    x = rossi.drop(columns=["week", "arrest"]).to_numpy(float)
    beta = newton_fit(x, rossi.week.to_numpy(float), rossi.arrest.to_numpy(float), "efron")
    ref = CoxPHFitter().fit(rossi, "week", "arrest").params_.to_numpy()
    np.testing.assert_allclose(beta, ref, atol=1e-4, rtol=0)

    g = gbsg2_frame()
    x = g.drop(columns=["time", "cens"]).to_numpy(float)
    beta = newton_fit(x, g.time.to_numpy(), g.cens.to_numpy(), "efron")
    ref = CoxPHFitter().fit(g, "time", "cens").params_.to_numpy()
    np.testing.assert_allclose(beta, ref, atol=1e-4, rtol=0)


def test_cox_fit_matches_sksurv_breslow_on_gbsg2_and_rossi() -> None:
    g = gbsg2_frame()
    x = g.drop(columns=["time", "cens"]).to_numpy(float)
    beta = newton_fit(x, g.time.to_numpy(), g.cens.to_numpy(), "breslow")
    sk = CoxPHSurvivalAnalysis(ties="breslow", alpha=0).fit(x, Surv.from_arrays(g.cens.astype(bool), g.time))
    np.testing.assert_allclose(beta, sk.coef_, atol=1e-4, rtol=0)

    rossi = load_rossi()
    x = rossi.drop(columns=["week", "arrest"]).to_numpy(float)
    beta = newton_fit(x, rossi.week.to_numpy(float), rossi.arrest.to_numpy(float), "breslow")
    y = Surv.from_arrays(rossi.arrest.astype(bool), rossi.week.astype(float))
    sk = CoxPHSurvivalAnalysis(ties="breslow", alpha=0).fit(x, y)
    np.testing.assert_allclose(beta, sk.coef_, atol=1e-4, rtol=0)


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_cox_gradcheck_with_tied_times(ties: str) -> None:
    gen = torch.Generator().manual_seed(3)
    eta = torch.randn(10, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 4.0, 4.0, 5.0, 5.0], dtype=torch.float64)
    e = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda r: cox_partial_likelihood_loss(r, t, e, ties=ties), (eta,))
    assert torch.autograd.gradgradcheck(lambda r: cox_partial_likelihood_loss(r, t, e, ties=ties), (eta,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cox_keeps_day_resolution_under_low_precision_risks(dtype: torch.dtype) -> None:
    """Times are only compared: days 300 and 301 (bf16 rounds both to 300) and 2049 (fp16: 2048) stay distinct, so
    the loss of low-precision risks equals the float32 loss up to the risks' own rounding, with no tie invented."""
    t = [300.0, 301.0, 302.0, 2049.0, 2048.0]
    e = [1, 1, 0, 1, 1]
    eta = torch.tensor([0.3, -0.1, 0.5, 0.2, -0.4])
    low = cox_partial_likelihood_loss(eta.to(dtype), t, e, ties="breslow")
    ref = cox_partial_likelihood_loss(eta.to(dtype).float(), t, e, ties="breslow")
    assert float(low) == pytest.approx(float(ref), rel=1e-2)


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_cox_no_event_is_zero_with_finite_grad(ties: str) -> None:
    eta = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    loss = cox_partial_likelihood_loss(eta, [1.0, 2.0, 2.0], [0, 0, 0], ties=ties)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.isfinite(eta.grad).all() and float(eta.grad.abs().sum()) == 0.0


def test_cox_stable_for_large_risks_and_direction() -> None:
    eta = torch.tensor([1e4, -1e4, 5e3, 0.0], dtype=torch.float32, requires_grad=True)
    t = torch.tensor([1.0, 1.0, 2.0, 3.0])
    e = torch.tensor([1.0, 1.0, 1.0, 0.0])
    loss = cox_partial_likelihood_loss(eta, t, e)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(eta.grad).all()
    # higher risk = earlier event: the concordant ordering has the lower loss
    t2 = torch.tensor([1.0, 2.0, 3.0])
    e2 = torch.ones(3)
    good = cox_partial_likelihood_loss(torch.tensor([2.0, 1.0, 0.0]), t2, e2)
    bad = cox_partial_likelihood_loss(torch.tensor([0.0, 1.0, 2.0]), t2, e2)
    assert float(good) < float(bad)


def test_cox_bad_input_names_the_argument() -> None:
    r = torch.zeros(3)
    with pytest.raises(ValueError, match="risk_scores"):
        cox_partial_likelihood_loss(torch.zeros(3, 1), [1, 2, 3], [1, 0, 1])
    with pytest.raises(ValueError, match="length mismatch"):
        cox_partial_likelihood_loss(r, [1, 2], [1, 0, 1])
    with pytest.raises(ValueError, match="times"):
        cox_partial_likelihood_loss(r, [1, -2, 3], [1, 0, 1])
    with pytest.raises(ValueError, match="times"):
        cox_partial_likelihood_loss(r, [1, float("nan"), 3], [1, 0, 1])
    with pytest.raises(ValueError, match="risk_scores"):
        cox_partial_likelihood_loss(torch.tensor([0.0, float("inf"), 1.0]), [1, 2, 3], [1, 0, 1])
    with pytest.raises(ValueError, match="events"):
        cox_partial_likelihood_loss(r, [1, 2, 3], [1, 2, 1])
    with pytest.raises(ValueError, match="ties"):
        cox_partial_likelihood_loss(r, [1, 2, 3], [1, 0, 1], ties="exact")
    with pytest.raises(ValueError, match="reduction"):
        cox_partial_likelihood_loss(r, [1, 2, 3], [1, 0, 1], reduction="none")


# --------------------------------------------------------------------------------------------------------------
# risk-set memory
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_memory_of_censored_patients_equals_full_loss(ties: str) -> None:
    rng = np.random.default_rng(4)
    eta = torch.tensor(rng.normal(size=10))
    t = torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    e = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    mem = RiskSetMemory(16)
    mem.update(eta[5:], t[5:], e[5:])
    batch = eta[:5].clone().requires_grad_(True)
    got = mem.loss(batch, t[:5], e[:5], ties)
    full = cox_partial_likelihood_loss(torch.cat([batch, eta[5:]]), t, e, ties=ties)
    assert float(got.detach()) == pytest.approx(float(full.detach()), rel=1e-12)
    got.backward()
    assert batch.grad is not None and torch.isfinite(batch.grad).all()


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_memory_gradient_equals_full_likelihood_gradient(ties: str) -> None:
    """The batch's gradient is that of the full partial likelihood over batch U memory: remembered events whose
    risk set holds a batch patient push that patient down (without them a censored patient never moves)."""
    rng = np.random.default_rng(5)
    n = 14
    eta = torch.tensor(rng.normal(size=n))
    t = torch.tensor(rng.integers(0, 4, n).astype(float))  # ties between batch and memory
    e = torch.tensor(rng.integers(0, 2, n).astype(float))
    e[0] = e[n - 1] = 1.0
    a, b = slice(0, 6), slice(6, n)
    mem = RiskSetMemory(64)
    mem.update(eta[b], t[b], e[b])
    batch = eta[a].clone().requires_grad_(True)
    n_counted = e[a].sum() + (e[b] * (t[b] <= t[a].max())).sum()
    (mem.loss(batch, t[a], e[a], ties) * n_counted).backward()
    full_batch = eta[a].clone().requires_grad_(True)
    cox_partial_likelihood_loss(torch.cat([full_batch, eta[b]]), t, e, ties=ties, reduction="sum").backward()
    torch.testing.assert_close(batch.grad, full_batch.grad, rtol=1e-10, atol=1e-12)


def test_memory_pushes_a_censored_batch_patient_down() -> None:
    mem = RiskSetMemory(8)
    mem.update(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))
    censored = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    mem.loss(censored, torch.tensor([5.0]), torch.tensor([0.0])).backward()
    assert float(censored.grad) > 0  # gradient descent lowers the risk of the patient who lived longest


def test_memory_fifo_keys_clear_and_no_event() -> None:
    mem = RiskSetMemory(3)
    for i in range(5):
        mem.update(torch.tensor([float(i)]), [float(i + 1)], [1])
    assert len(mem) == 3
    assert [item[0] for item in mem._items] == [2.0, 3.0, 4.0]
    mem.clear()
    assert len(mem) == 0
    keyed = RiskSetMemory(8)
    keyed.update(torch.tensor([0.1, 0.2]), [1.0, 2.0], [1, 0], keys=["p1", "p2"])
    keyed.update(torch.tensor([0.5]), [1.0], [1], keys=["p1"])
    assert len(keyed) == 2
    # a batch patient does not compete against its own remembered copy
    r = torch.tensor([0.7], requires_grad=True)
    with_self_excluded = keyed.loss(r, [1.0], [1], keys=["p1"])
    expected = cox_partial_likelihood_loss(torch.tensor([0.7, 0.2]), [1.0, 2.0], [1.0, 0.0])
    assert float(with_self_excluded.detach()) == pytest.approx(float(expected), rel=1e-6)
    # no batch event, and no remembered event whose risk set holds the batch patient (censored before t = 1)
    z = keyed.loss(r, [0.5], [0], keys=["p3"])
    z.backward()
    assert float(z.detach()) == 0.0 and float(r.grad.abs().sum()) == 0.0
    with pytest.raises(ValueError, match="size"):
        RiskSetMemory(-1)
    with pytest.raises(ValueError, match="keys"):
        keyed.update(torch.tensor([0.1]), [1.0], [1], keys=["a", "b"])


# --------------------------------------------------------------------------------------------------------------
# segmentation losses
# --------------------------------------------------------------------------------------------------------------
def test_dice_loss_agrees_with_monai_and_formula() -> None:
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 1, 5, 6, 4, generator=gen, dtype=torch.float64)
    target = (torch.rand(3, 1, 5, 6, 4, generator=gen) > 0.7).double()
    target[1] = 0.0  # an empty target
    ours = dice_loss(logits, target)
    monai = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    g = target.flatten(1)
    manual = (1 - (2 * (p * g).sum(1) + 1e-5) / (p.sum(1) + g.sum(1) + 1e-5)).mean()
    assert float(ours) == pytest.approx(float(monai), rel=1e-12)
    assert float(ours) == pytest.approx(float(manual), rel=1e-12)
    probs = torch.sigmoid(logits)
    assert float(dice_loss(probs, target, sigmoid=False)) == pytest.approx(float(manual), rel=1e-12)
    with pytest.raises(ValueError, match="shape"):
        dice_loss(logits, target[:, :, :4])


def test_weighted_bce_agrees_with_torch_and_is_stable() -> None:
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 1, 4, 4, 4, generator=gen)
    target = (torch.rand(2, 1, 4, 4, 4, generator=gen) > 0.8).float()
    ref = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([5.0]))(logits, target)
    assert float(weighted_bce(logits, target, pos_weight=5.0)) == pytest.approx(float(ref), rel=1e-6)
    assert float(weighted_bce(logits, target, pos_weight=torch.tensor(5.0))) == pytest.approx(float(ref), rel=1e-6)
    # manual formula: -[w y log s(x) + (1-y) log(1-s(x))]
    x, y = logits.double(), target.double()
    manual = -(5.0 * y * torch.nn.functional.logsigmoid(x) + (1 - y) * torch.nn.functional.logsigmoid(-x)).mean()
    assert float(weighted_bce(x, y, pos_weight=5.0)) == pytest.approx(float(manual), rel=1e-12)
    big = torch.tensor([1e4, -1e4, 1e4, -1e4], requires_grad=True)
    tgt = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss = weighted_bce(big, tgt, pos_weight=3.0)
    loss.backward()
    assert float(loss.detach()) == pytest.approx((1e4 + 3.0 * 1e4) / 4, rel=1e-6)
    assert torch.isfinite(big.grad).all()
    with pytest.raises(ValueError, match="pos_weight"):
        weighted_bce(logits, target, pos_weight=0.0)


# --------------------------------------------------------------------------------------------------------------
# multi-task loss
# --------------------------------------------------------------------------------------------------------------
def make_batch(b: int, has_label: list[bool], event: list[float], time: list[float]) -> dict:
    gen = torch.Generator().manual_seed(8)
    rec = (torch.rand(b, 1, 4, 4, 4, generator=gen) > 0.7).float()
    return {
        "recurrence": rec,
        "has_label": torch.tensor(has_label),
        "event": torch.tensor(event),
        "time": torch.tensor(time),
        "patient_id": [f"p{i}" for i in range(b)],
    }


def test_multitask_loss_combines_parts_and_uses_memory() -> None:
    torch.manual_seed(9)
    crit = MultiTaskLoss(1.0, 0.5, 2.0, pos_weight=4.0, ties="efron", memory_size=8)
    logits = torch.randn(2, 1, 4, 4, 4, requires_grad=True)
    risk = torch.randn(2, requires_grad=True)
    batch = make_batch(2, [True, False], [1.0, 0.0], [10.0, 20.0])
    out = crit(logits, risk, batch)
    assert isinstance(out, LossOutput)
    lab = batch["has_label"]
    dice = dice_loss(logits[lab], batch["recurrence"][lab])
    bce = weighted_bce(logits[lab], batch["recurrence"][lab], pos_weight=4.0)
    cox = cox_partial_likelihood_loss(risk, batch["time"], batch["event"])
    assert float(out.total.detach()) == pytest.approx(float((dice + 0.5 * bce + 2.0 * cox).detach()), rel=1e-6)
    assert out.parts["dice"] == pytest.approx(float(dice.detach()), rel=1e-6)
    assert out.parts["n_labelled"] == 1.0 and out.parts["n_events"] == 1.0
    out.total.backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(risk.grad).all()
    assert float(logits.grad[1].abs().sum()) == 0.0  # unlabelled sample gets no segmentation gradient
    assert len(crit.memory) == 2
    # The next train-mode call's Cox part is over the batch and the remembered patients (RiskSetMemory.loss).
    risk2 = torch.randn(2, requires_grad=True)
    batch2 = {**make_batch(2, [False, False], [1.0, 0.0], [15.0, 5.0]), "patient_id": ["p2", "p3"]}
    with_memory = crit.memory.loss(risk2.detach(), batch2["time"], batch2["event"], "efron",
                                   keys=batch2["patient_id"])
    batch_only = cox_partial_likelihood_loss(risk2.detach(), batch2["time"], batch2["event"])
    assert float(with_memory) != pytest.approx(float(batch_only))  # the remembered patients change it
    out2 = crit(logits.detach(), risk2, batch2)
    assert out2.parts["cox"] == pytest.approx(float(with_memory), rel=1e-6)
    assert len(crit.memory) == 4
    crit.eval()
    crit(logits.detach(), risk.detach(), make_batch(2, [False, False], [0.0, 1.0], [5.0, 30.0]))
    assert len(crit.memory) == 4  # eval mode reads but never writes the memory
    crit.reset_memory()
    assert len(crit.memory) == 0


def test_multitask_loss_without_labels_or_events_is_zero_with_grad() -> None:
    crit = MultiTaskLoss(memory_size=0)
    logits = torch.randn(1, 1, 4, 4, 4, requires_grad=True)
    risk = torch.randn(1, requires_grad=True)
    out = crit(logits, risk, make_batch(1, [False], [0.0], [12.0]))
    out.total.backward()
    assert float(out.total.detach()) == 0.0
    assert float(logits.grad.abs().sum()) == 0.0 and float(risk.grad.abs().sum()) == 0.0


def test_multitask_loss_bad_input() -> None:
    crit = MultiTaskLoss()
    logits = torch.randn(2, 1, 4, 4, 4)
    batch = make_batch(2, [True, True], [1.0, 0.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="risk"):
        crit(logits, torch.zeros(3), batch)
    with pytest.raises(ValueError, match="time"):
        crit(logits, torch.zeros(2), {k: v for k, v in batch.items() if k != "time"})
    with pytest.raises(ValueError, match="recurrence"):
        crit(logits, torch.zeros(2), {**batch, "recurrence": torch.zeros(2, 1, 3, 4, 4)})
    with pytest.raises(ValueError, match="w_cox"):
        MultiTaskLoss(1.0, 1.0, -1.0)
    with pytest.raises(ValueError, match="ties"):
        MultiTaskLoss(ties="exact")
