"""Calibration: batches holding NaN / inf are ignored with a warning, and the ``calibrate`` helper."""
import logging

import pytest
import torch

from ts_qat_pytorch.convert_export import convert_export
from ts_qat_pytorch.fake_quantize import FixedFakeQuantize, QuantizeBase
from ts_qat_pytorch.observer import OBSERVERS, MinMaxObserver
from ts_qat_pytorch.prepare_by_platform import prepare_by_platform
from ts_qat_pytorch.scheme import QuantScheme
from ts_qat_pytorch.utils.calibrate import calibrate

from .test_prepare import Block

X = torch.randn(2, 3, 8, 8)


def _poisoned(x, value):
    x = x.clone()
    x.view(-1)[3] = value
    return x


@pytest.mark.parametrize("obs_name", sorted(OBSERVERS))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_observers_keep_their_statistics_through_a_nonfinite_batch(obs_name, value):
    obs = OBSERVERS[obs_name](QuantScheme(symmetry=False))
    x = torch.randn(4, 3, 5, 5)
    obs(x)
    expected = obs.calculate_qparams()
    obs(_poisoned(x * 3, value))
    scale, zp = obs.calculate_qparams()
    assert torch.equal(scale, expected[0]) and torch.equal(zp, expected[1])


def test_a_nonfinite_batch_is_ignored_with_a_warning_naming_the_quantizer(caplog):
    fq = FixedFakeQuantize(QuantScheme(symmetry=False), observer=MinMaxObserver)
    fq.qualname = "layer3_post_act_fake_quantizer"
    fq.enable_fake_quant(False)
    fq(torch.tensor([-1.0, 3.0]))
    with caplog.at_level(logging.WARNING, logger="ts_qat_pytorch"):
        fq(torch.tensor([0.0, float("nan")]))
        fq(torch.tensor([0.0, float("inf")]))
    fq(torch.tensor([-0.5, 0.5]))
    # min / max over the finite batches only: the NaN batch did not reset them, the inf one did not stretch them
    assert (float(fq.activation_post_process.min_val), float(fq.activation_post_process.max_val)) == (-1.0, 3.0)
    assert float(fq.scale) == pytest.approx(4.0 / 255)
    assert "fake quantizer 'layer3_post_act_fake_quantizer': ignored a calibration batch holding NaN/inf" in caplog.text
    assert fq.nonfinite_batches == 2


def test_a_calibration_of_only_nonfinite_batches_says_so(tmp_path):
    q = prepare_by_platform(Block().eval())
    calibrate(q, [torch.full((2, 3, 8, 8), float("nan"))])
    with pytest.raises(RuntimeError, match=r"every calibration batch it saw was non-finite \(NaN/inf\)"):
        q(X)
    with pytest.raises(RuntimeError, match=r"x_post_act_fake_quantizer.*every calibration batch it saw was non-finite"):
        convert_export(q, X, str(tmp_path / "m.onnx"))  # the export says so too, not "never calibrated"
    q2 = prepare_by_platform(Block().eval())  # the count travels in the state_dict
    q2.load_state_dict(q.state_dict())
    assert q2.x_post_act_fake_quantizer.nonfinite_batches == 1


def test_calibrate_sets_modes_moves_batches_and_restores_training(caplog):
    q = prepare_by_platform(Block().train())
    seen = []
    q.register_forward_pre_hook(lambda m, args: seen.append((m.training, torch.is_grad_enabled())))
    loader = [(X, torch.zeros(2)), (X * 2, torch.ones(2)), (X * 3, torch.ones(2))]
    with caplog.at_level(logging.INFO, logger="ts_qat_pytorch"):
        n = calibrate(q, loader, num_batches=2)
    assert n == 2 and seen == [(False, False), (False, False)]
    assert "calibration: 2/2 batches" in caplog.text
    assert q.training  # the previous mode is back
    fqs = [m for m in q.modules() if isinstance(m, QuantizeBase)]
    assert all(m.initialized and m.fake_quant_enabled and not m.observer_enabled for m in fqs if not m.is_weight)
    # num_batches=2: the input quantizer saw X and 2 X (EMA), not 3 X
    ema = q.x_post_act_fake_quantizer.activation_post_process
    assert float(ema.max_val) == pytest.approx(float(X.max()) * (0.9 + 0.1 * 2))


def test_calibrate_takes_dicts_generators_and_a_forward_callable():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, a, b):
            return self.fc(a + b)

    q = prepare_by_platform(TwoInputs().eval())
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    assert calibrate(q, ({"a": a, "b": b} for _ in range(3))) == 3
    assert calibrate(q, [(a, b)], forward=lambda m, batch: m(*batch)) == 1
    with pytest.raises(ValueError, match="batches is empty"):
        calibrate(q, [])
    with pytest.raises(ValueError, match="batches is empty"):
        calibrate(q, iter(()))
