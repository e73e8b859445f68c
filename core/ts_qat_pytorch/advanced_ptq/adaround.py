"""AdaRound (Nagel et al. 2020): learned up / down rounding of each weight.

    w_q  = s * (clamp(floor(w / s) + h(V) + zp, qmin, qmax) - zp)
    h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)

with zeta = 1.1, gamma = -0.1 (the rectified sigmoid reaches 0 and 1 exactly), and the regulariser
sum(1 - |2 h - 1|^beta), whose beta is annealed from large (rounding free to move) to small (every h pushed to 0
or 1). At the end h is hardened to {0, 1}.

Export: :func:`write_back` puts the hardened grid values into the layer's float weight (through the BN fold where
there is one) and gives the layer its own weight quantizer back. Round-to-nearest of a value already on the grid is
that value, so the frozen export, a checkpoint and further QAT all carry exactly the rounding that was learned.
"""
from __future__ import annotations

import torch
from torch import nn

from ..fake_quantize import QuantizeBase

__all__ = ["AdaRoundFakeQuantize", "beta_at", "supports_adaround", "weight_fold_factor", "write_back"]

ZETA, GAMMA = 1.1, -0.1


def supports_adaround(fq: QuantizeBase) -> bool:
    """A weight quantizer whose deployed integers are round(w / s) + zp of the weight itself (no transform such as
    DoReFa's tanh, which a learned rounding could not be written back through)."""
    return (isinstance(fq, QuantizeBase) and fq.is_weight and fq.initialized and fq.fake_quant_enabled
            and type(fq).export_transform is QuantizeBase.export_transform)


class AdaRoundFakeQuantize(QuantizeBase):
    """Takes a calibrated weight quantizer's place during reconstruction: same scale, zero point and range, with a
    learned rounding of ``weight`` (the tensor the layer passes in, BN already folded)."""

    def __init__(self, base: QuantizeBase, weight: torch.Tensor):
        super().__init__(base.scheme)
        self.enable_observer(False)
        self.is_weight, self.initialized, self.qualname = True, True, base.qualname
        scale, zero_point = base.qparams()
        self.register_buffer("scale", scale.detach().clone().float())
        self.register_buffer("zero_point", zero_point.detach().clone().float())
        self.hard = False
        w = weight.detach().float() / self.broadcast(self.scale, weight)
        rest = (w - torch.floor(w)).clamp(1e-4, 1 - 1e-4)
        # V such that h(V) equals the fractional part: the soft rounding starts at the float weight
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def h(self) -> torch.Tensor:
        """The rounding offsets in [0, 1]; exactly 0 or 1 once hardened."""
        if self.hard:
            return (self.alpha.detach() >= 0).float()
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def round_loss(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def harden(self) -> None:
        self.hard = True

    def integers(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = self.broadcast(self.scale, x), self.broadcast(self.zero_point, x)
        return torch.clamp(torch.floor(x.detach() / scale) + self.h() + zp, self.quant_min, self.quant_max)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = self.broadcast(self.scale, x), self.broadcast(self.zero_point, x)
        return (self.integers(x) - zp) * scale

    def qparams(self):
        return self.scale.reshape(-1).clone(), self.zero_point.round().reshape(-1).int()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hard={self.hard}"


def beta_at(step: int, max_count: int, warm_up: float, b_range: tuple[float, float]) -> float | None:
    """The regulariser's beta at ``step`` (None during the warm-up: no regulariser): linear from b_range[0] to
    b_range[1] over the iterations after the warm-up."""
    start = warm_up * max_count
    if step < start:
        return None
    rel = (step - start) / max(1.0, max_count - start)
    return b_range[1] + (b_range[0] - b_range[1]) * max(0.0, 1.0 - rel)


@torch.no_grad()
def weight_fold_factor(layer: nn.Module) -> torch.Tensor:
    """The per-element factor between the layer's float weight and the weight it quantizes (the BN fold; ones
    without a BN): quantized_weight_source is linear in the weight, so it maps a weight of ones to the factor."""
    saved = layer.weight.data.clone()
    try:
        layer.weight.data.fill_(1.0)
        return layer.quantized_weight_source()[0].detach().clone()
    finally:
        layer.weight.data.copy_(saved)


@torch.no_grad()
def write_back(layer: nn.Module, ada: AdaRoundFakeQuantize, base: QuantizeBase) -> float:
    """Harden ``ada``, store its grid values in ``layer.weight`` and reinstall ``base``. Returns the fraction of
    weights rounded the other way than round-to-nearest."""
    ada.harden()
    w = layer.quantized_weight_source()[0].detach()
    q = ada.integers(w)
    scale, zp = ada.broadcast(ada.scale, w), ada.broadcast(ada.zero_point, w)
    nearest = torch.clamp(torch.round(w / scale) + zp, ada.quant_min, ada.quant_max)
    factor = weight_fold_factor(layer)
    q = torch.where(factor == 0, nearest, q)  # a weight a zero BN gamma multiplies away: nothing to learn
    target = (q - zp) * scale
    layer.weight.data.copy_(torch.where(factor == 0, layer.weight.data, target / factor).to(layer.weight.dtype))
    layer.weight_fake_quant = base
    check = torch.clamp(torch.round(layer.quantized_weight_source()[0] / scale) + zp, ada.quant_min, ada.quant_max)
    if not torch.equal(check, q):  # float error of the fold larger than half a step: never expected
        raise RuntimeError(f"AdaRound write-back of '{ada.qualname}' does not reproduce the learned rounding "
                           f"({int((check != q).sum())} weights differ)")
    return float((q != nearest).float().mean())
