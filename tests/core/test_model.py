"""ST-RPNet: shapes for any number of timepoints, invariance to padding, use of the scan dates, input checks."""

from __future__ import annotations

import pytest
import torch

from strpnet_core.model import (
    CNN3DDecoder,
    CNN3DEncoder,
    ModelConfig,
    STRPNet,
    TemporalLSTM,
    count_parameters,
)

TINY = ModelConfig(widths=(4, 8, 8), lstm_hidden=6, risk_hidden=8, dropout=0.0)
S = 8  # spatial size of the tiny tests (divisible by 2**(3-1))


def _model(cfg: ModelConfig = TINY, seed: int = 0, *, fresh: bool = False) -> STRPNet:
    """A model in eval mode; unless ``fresh``, its risk head is moved off its initial state (where the risk is 0 for
    every input: see ``test_initial_state_is_the_tied_covariate_model_and_the_recurrence_prior``) so that the tests
    of invariances and of the use of the inputs see a risk that depends on them."""
    torch.manual_seed(seed)
    model = STRPNet(cfg)
    if not fresh:
        with torch.no_grad():
            torch.nn.init.normal_(model.risk_head.mlp[-1].weight, std=0.5)
            if model.risk_head.beta is not None:
                model.risk_head.beta.fill_(-0.7)
    return model.eval()


def _inputs(b: int, t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, t, 4, S, S, S, generator=g)
    days = torch.cumsum(torch.rand(b, t, generator=g) * 100, dim=1)
    days[:, 0] = 0
    return images, days, torch.ones(b, t, dtype=torch.bool)


@pytest.mark.parametrize("t", [1, 2, 3, 4])
def test_output_shapes_for_any_number_of_timepoints(t: int) -> None:
    images, days, mask = _inputs(2, t)
    out = _model()(images, days, mask)
    assert out.recurrence_logits.shape == (2, 1, S, S, S)
    assert out.risk.shape == (2,)
    assert out.risk.dtype == torch.float32
    assert torch.isfinite(out.recurrence_logits).all() and torch.isfinite(out.risk).all()


def test_mixed_timepoints_in_one_batch_and_padding_invariance() -> None:
    model = _model()
    images, days, mask = _inputs(3, 4, seed=1)
    mask[0, 1:] = False  # patient 0: 1 scan; patient 1: 3 scans; patient 2: 4 scans
    mask[1, 3:] = False
    images[~mask] = 123.0  # padded content must be ignored, whatever it holds
    days[~mask] = 0.0
    with torch.no_grad():
        out = model(images, days, mask)
        for b, t in ((0, 1), (1, 3), (2, 4)):
            alone = model(images[b: b + 1, :t], days[b: b + 1, :t], mask[b: b + 1, :t])
            torch.testing.assert_close(out.recurrence_logits[b: b + 1], alone.recurrence_logits, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out.risk[b: b + 1], alone.risk, atol=1e-5, rtol=1e-4)


def test_masked_step_in_the_middle_keeps_the_state() -> None:
    """A masked step is skipped: same result as the sequence without it (elapsed time from the previous real scan)."""
    model = _model()
    images, days, mask = _inputs(1, 3, seed=2)
    mask[0, 1] = False
    keep = [0, 2]
    with torch.no_grad():
        a = model(images, days, mask)
        b = model(images[:, keep], days[:, keep], mask[:, keep])
    torch.testing.assert_close(a.risk, b.risk, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.recurrence_logits, b.recurrence_logits, atol=1e-4, rtol=1e-4)


def test_scan_intervals_change_the_prediction() -> None:
    model = _model()
    images, days, mask = _inputs(1, 3, seed=3)
    with torch.no_grad():
        a = model(images, days, mask)
        b = model(images, days * 5, mask)
    assert not torch.allclose(a.risk, b.risk)
    assert not torch.allclose(a.recurrence_logits, b.recurrence_logits)


def test_time_mask_default_and_integer_mask() -> None:
    model = _model()
    images, days, mask = _inputs(2, 2, seed=4)
    with torch.no_grad():
        a = model(images, days)
        b = model(images, days, mask.int())
        mask[0, 1] = False  # a missing scan, given as a bool mask and as an integer one
        c = model(images, days, mask)
        d = model(images, days, mask.int())
    torch.testing.assert_close(a.risk, b.risk)
    torch.testing.assert_close(c.risk, d.risk)
    assert not torch.allclose(a.risk[0], c.risk[0])  # the integer mask is read, not ignored


def test_every_parameter_gets_a_gradient() -> None:
    model = _model().train()
    images, days, mask = _inputs(2, 3, seed=5)
    mask[0, 2] = False
    out = model(images, days, mask)
    (out.recurrence_logits.mean() + out.risk.sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_initial_state_is_the_tied_covariate_model_and_the_recurrence_prior() -> None:
    """At initialisation every patient has risk 0 (beta = 0, deep term's last layer 0: training starts from ties)
    and the recurrence map is near the rare-class prior sigmoid(bias) = RECURRENCE_PRIOR, not 0.5."""
    from strpnet_core.model import RECURRENCE_PRIOR

    model = _model(fresh=True)
    images, days, mask = _inputs(3, 3, seed=8)
    with torch.no_grad():
        out = model(images, days, mask)
    assert torch.equal(out.risk, torch.zeros(3))
    p = torch.sigmoid(out.recurrence_logits)
    assert abs(float(p.median()) - RECURRENCE_PRIOR) < 0.02
    assert float(p.max()) < 0.5
    # one Adam step on the Cox-type gradient moves beta and the deep term off zero
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    (-(model(images, days, mask).risk * torch.tensor([1.0, -1.0, 0.5])).sum()).backward()
    opt.step()
    with torch.no_grad():
        assert float(model.risk_head.beta.abs()) > 0
        assert model.eval()(images, days, mask).risk.abs().max() > 0


def test_bf16_autocast_forward_keeps_float32_risk() -> None:
    model = _model()
    images, days, mask = _inputs(1, 2, seed=6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, days, mask)
    assert out.risk.dtype == torch.float32
    assert torch.isfinite(out.recurrence_logits.float()).all()


def test_default_config_is_about_a_million_parameters_and_runs() -> None:
    cfg = ModelConfig()
    assert cfg.depth == 4 and cfg.divisor == 8
    model = STRPNet(cfg)
    assert 0.5e6 < count_parameters(model) < 1.5e6
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 2, 4, 16, 16, 16), torch.tensor([[0.0, 90.0]]))
    assert out.recurrence_logits.shape == (1, 1, 16, 16, 16)


def test_building_blocks() -> None:
    enc = CNN3DEncoder(4, (4, 8, 16))
    feats = enc(torch.randn(2, 4, S, S, S))
    assert [tuple(f.shape) for f in feats] == [(2, 4, 8, 8, 8), (2, 8, 4, 4, 4), (2, 16, 2, 2, 2)]
    lstm = TemporalLSTM(16, 5)
    x = torch.randn(2, 3, 16, 2, 2, 2)
    h, c = lstm(x, torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool))
    assert h.shape == c.shape == (2, 5, 2, 2, 2)
    dec = CNN3DDecoder((4, 8, 16))
    assert dec(feats[-1], feats[:-1]).shape == (2, 1, S, S, S)


def test_config_round_trip_and_parsing() -> None:
    cfg = ModelConfig(widths=(4, 8), lstm_hidden=3, dropout=0.2)
    d = cfg.to_dict()
    assert d["widths"] == [4, 8]
    assert ModelConfig.from_dict(d) == cfg
    assert ModelConfig.from_dict({"widths": "8, 16,32"}).widths == (8, 16, 32)
    with pytest.raises(ValueError, match="unknown key"):
        ModelConfig.from_dict({"width": [4, 8]})
    for bad in ({"widths": (8,)}, {"widths": (8, 0)}, {"dropout": 1.0}, {"lstm_hidden": 0},
                {"time_scale_days": 0}, {"lstm_kernel": 2}, {"widths": "a,b"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ModelConfig(**bad)


def _bad_cases() -> list[tuple[str, dict, str]]:
    images, days, mask = _inputs(2, 2)
    nan_images = images.clone()
    nan_images[0, 0, 0, 0, 0, 0] = float("nan")
    neg_days = days.clone()
    neg_days[1, 1] = -3.0
    dec_days = torch.tensor([[0.0, 50.0], [10.0, 5.0]])
    no_true = mask.clone()
    no_true[1] = False
    return [
        ("rank", dict(images=images[0], days=days, time_mask=mask), "images"),
        ("t0", dict(images=images[:, :0], days=days[:, :0], time_mask=mask[:, :0]), "T = 0"),
        ("channels", dict(images=images[:, :, :3], days=days, time_mask=mask), "channels"),
        ("nan", dict(images=nan_images, days=days, time_mask=mask), "images contains NaN"),
        ("int images", dict(images=images.long(), days=days, time_mask=mask), "images"),
        ("neg days", dict(images=images, days=neg_days, time_mask=mask), "days"),
        ("decreasing days", dict(images=images, days=dec_days, time_mask=mask), "days"),
        ("inf days", dict(images=images, days=days.clone().fill_(float("inf")), time_mask=mask), "days"),
        ("days shape", dict(images=images, days=days[:, :1], time_mask=mask), "days"),
        ("mask shape", dict(images=images, days=days, time_mask=mask[:1]), "time_mask"),
        ("mask no true", dict(images=images, days=days, time_mask=no_true), "time_mask"),
        ("mask values", dict(images=images, days=days, time_mask=mask.int() * 2), "time_mask"),
        ("spatial", dict(images=torch.randn(2, 2, 4, 6, 8, 8), days=days, time_mask=mask), "2\\*\\*\\(depth-1\\)"),
        ("days type", dict(images=images, days=[[0, 1], [0, 1]], time_mask=mask), "days"),
    ]


@pytest.mark.parametrize("name,kwargs,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs_raise_value_error_naming_the_argument(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _model()(**kwargs)


def test_too_small_bottleneck_is_refused() -> None:
    model = _model(ModelConfig(widths=(4, 8, 8, 8), lstm_hidden=4))
    with pytest.raises(ValueError, match="too small"):
        model(torch.randn(1, 1, 4, 8, 8, 8), torch.zeros(1, 1))
