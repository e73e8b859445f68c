"""Fake quantizers: fixed (observer-driven), LSQ, LSQ+, PACT and DoReFa."""
from .base import QuantizeBase
from .dorefa import DoReFaFakeQuantize
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
}

__all__ = ["QuantizeBase", "FAKE_QUANTIZERS", "FixedFakeQuantize", "LearnableFakeQuantize",
           "LSQPlusFakeQuantize", "PACTFakeQuantize", "DoReFaFakeQuantize"]
