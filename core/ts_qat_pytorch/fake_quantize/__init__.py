"""Fake quantizers: fixed (observer-driven), LSQ, LSQ+, PACT, DoReFa and DSQ.

``FAKE_QUANTIZERS`` is where ``w_fakequantize`` / ``a_fakequantize`` names are looked up."""
from .base import QuantizeBase
from .dorefa import DoReFaFakeQuantize
from .dsq import DSQFakeQuantize
from .fixed import FixedFakeQuantize
from .lsq import LearnableFakeQuantize, LSQPlusFakeQuantize
from .pact import PACTFakeQuantize

FAKE_QUANTIZERS = {
    "FixedFakeQuantize": FixedFakeQuantize,
    "LearnableFakeQuantize": LearnableFakeQuantize,
    "LSQFakeQuantize": LearnableFakeQuantize,
    "LSQPlusFakeQuantize": LSQPlusFakeQuantize,
    "PACTFakeQuantize": PACTFakeQuantize,
    "DoReFaFakeQuantize": DoReFaFakeQuantize,
    "DSQFakeQuantize": DSQFakeQuantize,
}

__all__ = ["QuantizeBase", "FAKE_QUANTIZERS", "FixedFakeQuantize", "LearnableFakeQuantize",
           "LSQPlusFakeQuantize", "PACTFakeQuantize", "DoReFaFakeQuantize", "DSQFakeQuantize"]
