import pytest
import torch

from ts_qat_pytorch.fake_quantize import (DoReFaFakeQuantize, FixedFakeQuantize, LearnableFakeQuantize,
                                          LSQPlusFakeQuantize, PACTFakeQuantize)
from ts_qat_pytorch.observer import EMAMinMaxObserver, MinMaxObserver
from ts_qat_pytorch.scheme import QuantScheme

ASYM = QuantScheme(bit=8, symmetry=False)
SYM_PC = QuantScheme(bit=8, symmetry=True, per_channel=True)


def _calibrated(fq, x):
    fq.enable_observer(True).enable_fake_quant(False)
    fq(x)
    fq.enable_observer(False).enable_fake_quant(True)
    return fq


@pytest.mark.parametrize("cls,scheme", [(FixedFakeQuantize, ASYM), (FixedFakeQuantize, SYM_PC),
                                        (LearnableFakeQuantize, ASYM), (LearnableFakeQuantize, SYM_PC),
                                        (LSQPlusFakeQuantize, ASYM), (PACTFakeQuantize, ASYM),
                                        (DoReFaFakeQuantize, SYM_PC)])
def test_output_lies_on_the_grid(cls, scheme):
    kw = {"channels": 4} if cls in (LearnableFakeQuantize, LSQPlusFakeQuantize) else {}
    fq = _calibrated(cls(scheme, observer=MinMaxObserver, **kw), torch.randn(4, 3, 5))
    x = torch.randn(4, 3, 5)
    y = fq(x)
    scale, zp = fq.qparams()
    shape = (-1, 1, 1) if scheme.per_channel else (1, 1, 1)
    q = y / scale.reshape(shape) + zp.reshape(shape)
    assert torch.allclose(q, q.round(), atol=1e-3)
    assert q.min() >= fq.quant_min - 1e-3 and q.max() <= fq.quant_max + 1e-3


def test_uncalibrated_activation_quantizer_raises_with_the_fix():
    fq = LearnableFakeQuantize(ASYM)
    fq.enable_observer(False)
    with pytest.raises(RuntimeError, match="enable_calibration"):
        fq(torch.randn(3))


def test_weight_quantizer_calibrates_itself():
    fq = LearnableFakeQuantize(SYM_PC, channels=4)
    fq.is_weight = True
    fq.enable_observer(False)
    w = torch.randn(4, 3)
    y = fq(w)
    assert fq.initialized
    assert torch.allclose(y.detach(), w, atol=float(fq.scale.detach().max()))


def test_integer_inputs_pass_untouched():
    fq = FixedFakeQuantize(ASYM)
    ids = torch.arange(10)
    assert fq(ids) is ids and fq.non_float


def _finite_diff(f, p, eps=1e-3):
    with torch.no_grad():
        p += eps
        up = f().item()
        p -= 2 * eps
        down = f().item()
        p += eps
    return (up - down) / (2 * eps)


def _ste_surrogate(x, scale, zp, qmin, qmax, s0, zp0):
    """LSQ's straight-through model of fake quantization: rounding offsets frozen at (s0, zp0), so the
    function is smooth in the scale and zero point and finite differences are meaningful."""
    v0 = x / s0 + zp0
    r = torch.round(v0) - v0                      # frozen rounding offset
    inside = (v0 + r >= qmin) & (v0 + r <= qmax)  # clipped elements sit at the bounds
    q = torch.where(inside, x / scale + zp + r, torch.clamp(v0 + r, qmin, qmax))
    return (q - zp) * scale


@pytest.mark.parametrize("cls", [LearnableFakeQuantize, LSQPlusFakeQuantize])
def test_learnable_gradients_match_finite_differences(cls):
    torch.manual_seed(0)
    fq = _calibrated(cls(ASYM, use_grad_scaling=False), torch.randn(2000) * 2)
    fq.scale.data.mul_(0.7)  # make some inputs clip
    x, w = torch.randn(2000) * 2, torch.randn(2000)
    (fq(x) * w).sum().backward()
    s0, zp0 = fq.scale.detach().double(), fq.zero_point.detach().double()
    x, w = x.double(), w.double()
    f = lambda s, z: (_ste_surrogate(x, s, z, 0, 255, s0, zp0) * w).sum().item()  # noqa: E731
    eps = 1e-4
    ds = (f(s0 + eps, zp0) - f(s0 - eps, zp0)) / (2 * eps)
    assert fq.scale.grad.item() == pytest.approx(ds, rel=1e-2, abs=1e-2)
    if cls is LSQPlusFakeQuantize:
        dz = (f(s0, zp0 + eps) - f(s0, zp0 - eps)) / (2 * eps)
        assert fq.zero_point.grad.item() == pytest.approx(dz, rel=1e-2, abs=1e-2)


def test_input_gradient_is_straight_through_inside_the_range():
    fq = _calibrated(LearnableFakeQuantize(ASYM), torch.linspace(-1, 1, 100))
    x = torch.tensor([-50.0, 0.0, 0.3, 50.0], requires_grad=True)
    fq(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_lsq_grad_scaling_divides_the_gradient():
    x = torch.randn(400)
    a = _calibrated(LearnableFakeQuantize(ASYM, use_grad_scaling=False), x)
    b = _calibrated(LearnableFakeQuantize(ASYM, use_grad_scaling=True), x)
    a(x).sum().backward()
    b(x).sum().backward()
    assert b.scale.grad.item() == pytest.approx(a.scale.grad.item() / (400 * 255) ** 0.5, rel=1e-4)


def test_lsq_plus_learns_the_zero_point():
    fq = _calibrated(LSQPlusFakeQuantize(ASYM, use_grad_scaling=False), torch.randn(500))
    x, w = torch.randn(500) * 20, torch.rand(500)  # some inputs clip: only they move the zero point
    (fq(x) * w).sum().backward()
    assert fq.zero_point.grad is not None and fq.zero_point.grad.abs().sum() > 0


def test_pact_alpha_gradient_is_the_clipped_mass():
    fq = PACTFakeQuantize(ASYM, observer=EMAMinMaxObserver, alpha=1.0)
    fq.initialized = True
    fq.enable_observer(False)
    x = torch.tensor([-1.0, 0.2, 0.5, 2.0, 3.0])
    y = fq(x)
    y.sum().backward()
    assert fq.alpha.grad.item() == pytest.approx(2.0)  # two inputs above alpha
    assert y.max().item() == pytest.approx(1.0)


def test_lsq_scale_stays_positive_and_capped():
    fq = _calibrated(LearnableFakeQuantize(ASYM), torch.rand(100))
    fq.max_scale = 6 / 255
    fq.scale.data.fill_(-1.0)
    fq(torch.rand(10))
    assert fq.scale.item() > 0
    fq.scale.data.fill_(1.0)
    fq(torch.rand(10))
    assert fq.scale.item() == pytest.approx(6 / 255)


@pytest.mark.parametrize("cls", [LearnableFakeQuantize, LSQPlusFakeQuantize, PACTFakeQuantize])
def test_evaluation_leaves_the_state_alone(cls):
    """eval() forwards must not rewrite parameters: in data-parallel training only rank 0 evaluates, and an in-place
    clamp there made its replica differ from the others. Training forwards still keep the parameters in range."""
    fq = _calibrated(cls(ASYM), torch.rand(100))
    fq.max_scale = 6 / 255
    p = fq.alpha if cls is PACTFakeQuantize else fq.scale
    p.data.fill_(-1.0 if cls is PACTFakeQuantize else 1.0)  # an optimizer step left it out of range
    if cls is LSQPlusFakeQuantize:
        fq.zero_point.data.fill_(300.0)
    before = {k: v.clone() for k, v in fq.state_dict().items() if isinstance(v, torch.Tensor)}
    x = torch.rand(10)
    y_eval = fq.eval()(x)
    for k, v in before.items():
        assert torch.equal(v, fq.state_dict()[k]), k
    y_train = fq.train()(x)
    assert torch.equal(y_eval, y_train)  # same effective parameters ...
    assert not torch.equal(p.detach(), before["alpha" if cls is PACTFakeQuantize else "scale"])  # ... now clamped


def test_switches_travel_in_the_state_dict():
    a = _calibrated(LearnableFakeQuantize(ASYM), torch.randn(10))
    b = LearnableFakeQuantize(ASYM)
    b.load_state_dict(a.state_dict())
    assert b.initialized and b.fake_quant_enabled and not b.observer_enabled
    assert torch.equal(a(torch.ones(3)), b(torch.ones(3)))


def test_dorefa_normalises_weights_with_tanh():
    fq = _calibrated(DoReFaFakeQuantize(SYM_PC, observer=MinMaxObserver), torch.randn(4, 3) * 5)
    y = fq(torch.randn(4, 3) * 5)
    assert y.abs().max() <= 1.0 + 1e-4


def test_exported_qparams_are_the_ones_the_forward_uses():
    fq = _calibrated(LearnableFakeQuantize(SYM_PC, channels=4), torch.randn(4, 8))
    fq.scale.data[0] = -0.5  # an optimizer step pushed it out of range
    scale, _ = fq.qparams()
    assert (scale > 0).all()
    x = torch.randn(4, 8)
    y = fq(x)
    q = y / scale.reshape(-1, 1)
    assert torch.allclose(q, q.round(), atol=1e-3)
