"""High-bias absorption (Nagel et al. 2019, section 4.2.1 and appendix): a large positive bias of layer 1 moved
through a ReLU into layer 2's bias.

If layer 1's pre-activation x_i (after folding its BatchNorm: mean beta_i, standard deviation |gamma_i|) stays above

    c_i = max(0, beta_i - 3 |gamma_i|)

then ReLU(x_i - c_i) = ReLU(x_i) - c_i, so with b1 <- b1 - c and b2 <- b2 + W2 c (W2 summed over its kernel for a
conv) the network is unchanged while layer 1's output range shrinks by c. Exact wherever x_i >= c_i (99.87 % of a
normal distribution); a conv layer 2 with zero padding adds W2 c at the image border as well, where the padded zeros
were never shifted (the paper's approximation too).
"""
from __future__ import annotations

import torch
from torch import nn

from .cle import channel_groups

__all__ = ["absorption_amount", "absorb"]


def absorption_amount(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return torch.clamp(mean - 3.0 * std, min=0.0)


@torch.no_grad()
def absorb(layer1: nn.Module, layer2: nn.Module, c: torch.Tensor) -> None:
    """b1 -= c, b2 += W2 c (in place; layer 2 gets a bias if it had none)."""
    c = c.to(layer1.bias)
    layer1.bias.sub_(c)
    w = layer2.weight
    g, opg, ipg = channel_groups(layer2)
    shift = torch.einsum("goi,gi->go", w.detach().float().reshape(g, opg, ipg, -1).sum(3),
                         c.float().reshape(g, ipg)).reshape(-1)
    if layer2.bias is None:
        layer2.bias = nn.Parameter(shift.to(w.dtype), requires_grad=w.requires_grad)
    else:
        layer2.bias.add_(shift.to(layer2.bias))
