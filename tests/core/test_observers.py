import math

import pytest
import torch

from ts_qat_pytorch.observer import (OBSERVERS, EMAMinMaxObserver, LSQObserver, MinMaxObserver, MSEObserver,
                                     PercentileObserver, qparams_from_minmax)
from ts_qat_pytorch.scheme import QuantScheme

SCHEMES = {
    "asym_u8": QuantScheme(bit=8, symmetry=False),
    "sym_s8_pc": QuantScheme(bit=8, symmetry=True, per_channel=True),
    "sym_s4": QuantScheme(bit=4, symmetry=True),
}


@pytest.mark.parametrize("obs_name", sorted(OBSERVERS))
@pytest.mark.parametrize("scheme_name", sorted(SCHEMES))
def test_observer_gives_valid_qparams(obs_name, scheme_name):
    scheme = SCHEMES[scheme_name]
    obs = OBSERVERS[obs_name](scheme)
    x = torch.randn(8, 4, 5, 5) * 3
    obs(x)
    obs(x * 0.5)
    scale, zp = obs.calculate_qparams()
    n = 8 if scheme.per_channel else 1
    assert scale.numel() == n and zp.numel() == n
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert ((zp >= scheme.quant_min) & (zp <= scheme.quant_max)).all()
    if scheme.symmetry:
        assert (zp == 0).all()


@pytest.mark.parametrize("obs_name", sorted(OBSERVERS))
@pytest.mark.parametrize("value", [0.0, 3.0, -2.0])
def test_zero_range_tensor_never_gives_nan_or_inf(obs_name, value):
    for scheme in SCHEMES.values():
        obs = OBSERVERS[obs_name](scheme)
        obs(torch.full((4, 3, 2, 2), value))
        scale, zp = obs.calculate_qparams()
        assert torch.isfinite(scale).all() and (scale > 0).all()
        # the constant itself is representable (up to one step)
        if value != 0.0 and not scheme.per_channel:
            q = torch.clamp(torch.round(torch.tensor(value) / scale) + zp, scheme.quant_min, scheme.quant_max)
            assert abs(float((q - zp) * scale) - value) <= float(scale) + 1e-6 or obs_name in ("LSQObserver",)


@pytest.mark.parametrize("obs_name", sorted(OBSERVERS))
def test_empty_and_batch1_inputs(obs_name):
    obs = OBSERVERS[obs_name](QuantScheme(symmetry=False))
    obs(torch.empty(0, 3, 4, 4))
    assert not obs.initialized
    with pytest.raises(RuntimeError, match="calibration"):
        obs.calculate_qparams()
    obs(torch.randn(1, 3, 4, 4))
    scale, _ = obs.calculate_qparams()
    assert torch.isfinite(scale).all()


def test_minmax_covers_range_and_asymmetric_zero_point_is_exact():
    obs = MinMaxObserver(QuantScheme(symmetry=False))
    obs(torch.tensor([-1.0, 3.0]))
    scale, zp = obs.calculate_qparams()
    assert math.isclose(float(scale), 4.0 / 255, rel_tol=1e-6)
    # real 0 maps to an integer exactly
    assert float((0 - zp) * scale) == pytest.approx(-1.0, abs=float(scale))


def test_ema_moves_towards_new_batches():
    obs = EMAMinMaxObserver(QuantScheme(symmetry=False), ema_ratio=0.5)
    obs(torch.tensor([0.0, 1.0]))
    obs(torch.tensor([0.0, 3.0]))
    assert float(obs.max_val) == pytest.approx(2.0)


def test_percentile_ignores_outliers():
    x = torch.randn(100000)
    x[0] = 1000.0
    p = PercentileObserver(QuantScheme(symmetry=True), percentile=0.999)
    p(x)
    m = MinMaxObserver(QuantScheme(symmetry=True))
    m(x)
    assert p.calculate_qparams()[0] < m.calculate_qparams()[0] / 50


def _qerr(x, scale, zp, scheme):
    q = torch.clamp(torch.round(x / scale) + zp, scheme.quant_min, scheme.quant_max)
    return float(((q - zp) * scale - x).pow(2).mean())


def test_mse_observer_beats_minmax_on_heavy_tails():
    scheme = QuantScheme(bit=4, symmetry=True)
    x = torch.distributions.StudentT(2.0).sample((20000,))
    mse, mm = MSEObserver(scheme), MinMaxObserver(scheme)
    mse(x)
    mm(x)
    assert _qerr(x, *mse.calculate_qparams(), scheme) < _qerr(x, *mm.calculate_qparams(), scheme)


def test_lsq_initialiser_formula():
    scheme = QuantScheme(bit=8, symmetry=True)
    obs = LSQObserver(scheme)
    x = torch.randn(1000)
    obs(x)
    scale, _ = obs.calculate_qparams()
    assert float(scale) == pytest.approx(2 * float(x.abs().mean()) / math.sqrt(127), rel=1e-5)


def test_per_channel_state_dict_round_trip():
    a = MinMaxObserver(QuantScheme(per_channel=True))
    a(torch.randn(6, 3))
    b = MinMaxObserver(QuantScheme(per_channel=True))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.calculate_qparams()[0], b.calculate_qparams()[0])


def test_pot_scale_is_power_of_two():
    s, _ = qparams_from_minmax(torch.tensor(-1.3), torch.tensor(2.7), QuantScheme(pot_scale=True))
    assert float(torch.log2(s)) == int(torch.log2(s))


def test_scheme_validation():
    with pytest.raises(ValueError, match="bit"):
        QuantScheme(bit=1)
    with pytest.raises(ValueError, match="unknown quantization scheme keys"):
        QuantScheme.from_dict({"bits": 4})
    s = QuantScheme.from_dict({"symmetry": False}, QuantScheme(symmetry=True))
    assert s.signed is False and (s.quant_min, s.quant_max) == (0, 255)
