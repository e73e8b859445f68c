"""The fake-quantizer base: a module that observes and/or fake-quantizes the tensor it is given.

State switches (``utils.state``) flip two plain Python flags, so the forward pass never branches
on a tensor (the current ONNX exporter and torch.compile both need that) and costs nothing to test.
The flags and ``initialized`` travel in the state_dict as extra state, so a resumed QAT run is in
exactly the mode it was saved in.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from ..observer import MinMaxObserver, ObserverBase
from ..scheme import QuantScheme

logger = logging.getLogger(__name__)


class QuantizeBase(nn.Module):
    """Observer + fake quantization for one tensor under one :class:`QuantScheme`."""

    def __init__(self, scheme: QuantScheme = QuantScheme(),
                 observer: Callable[[QuantScheme], ObserverBase] = MinMaxObserver):
        super().__init__()
        self.scheme = scheme
        self.quant_min, self.quant_max = scheme.quant_min, scheme.quant_max
        self.ch_axis = scheme.ch_axis if scheme.per_channel else -1
        self.activation_post_process = observer(scheme)
        self.observer_enabled = True
        self.fake_quant_enabled = True
        self.initialized = False
        # Upper bound on the scale (set for quantizers behind a bounded activation such as ReLU6,
        # so that the deployed Clip folds into the QuantizeLinear).
        self.max_scale: float | None = None
        self.qualname = ""  # set by prepare_by_platform, for error messages
        self.is_weight = False  # weight quantizers can calibrate themselves from the weight
        self.non_float = False  # has been given integer tensors (ids, masks): it stays a no-op
        self.nonfinite_batches = 0  # calibration batches ignored because they held NaN / inf
        self.observed_shape: tuple[int, ...] | None = None  # the last calibration tensor's shape (export errors)
        # Call sites per forward pass of a quantizer shared by several tensors (a concat's inputs and output):
        # it observes once per pass, the union of them, so a moving average sees one range instead of alternating.
        self.shared_sites = 1
        self._round: list[torch.Tensor] = []  # this pass's tensors so far (shared_sites > 1)

    # -- switches -----------------------------------------------------------------------------
    def enable_observer(self, enabled: bool = True):
        self.observer_enabled = bool(enabled)
        if not enabled:
            self._round = []  # a pass cut short must not leak into a later calibration
        return self

    def disable_observer(self):
        return self.enable_observer(False)

    def enable_fake_quant(self, enabled: bool = True):
        self.fake_quant_enabled = bool(enabled)
        return self

    def disable_fake_quant(self):
        return self.enable_fake_quant(False)

    def get_extra_state(self):
        return {"observer_enabled": self.observer_enabled, "fake_quant_enabled": self.fake_quant_enabled,
                "initialized": self.initialized, "non_float": self.non_float,
                "nonfinite_batches": self.nonfinite_batches, "observed_shape": self.observed_shape}

    def set_extra_state(self, state):
        self.observer_enabled = bool(state["observer_enabled"])
        self.fake_quant_enabled = bool(state["fake_quant_enabled"])
        self.initialized = bool(state["initialized"])
        self.non_float = bool(state.get("non_float", False))
        self.nonfinite_batches = int(state.get("nonfinite_batches", 0))
        shape = state.get("observed_shape")
        self.observed_shape = tuple(int(d) for d in shape) if shape is not None else None

    # -- numerics -----------------------------------------------------------------------------
    def observe(self, x: torch.Tensor) -> None:
        """Feed the observer and adopt its qparams. A tensor holding NaN or inf is ignored (with a warning):
        one diverged batch must not wipe the statistics of the others."""
        self.observed_shape = tuple(x.shape)
        if self.shared_sites > 1:
            x = self._join_round(x)
            if x is None:
                return
        self._observe_now(x)

    def _observe_now(self, x: torch.Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            self.nonfinite_batches += 1
            n = self.nonfinite_batches
            if n & (n - 1) == 0:  # 1st, 2nd, 4th, 8th ...: a diverged run would otherwise flood the log
                logger.warning("fake quantizer '%s': ignored a calibration batch holding NaN/inf (%d so far); its "
                               "statistics are kept. Look for a diverged layer or corrupt input data.",
                               self.qualname or type(self).__name__, n)
            return
        self.activation_post_process(x)
        if self.activation_post_process.initialized:
            scale, zero_point = self.activation_post_process.calculate_qparams()
            self._adopt_qparams(scale, zero_point)
            self.initialized = True

    def _join_round(self, x: torch.Tensor) -> torch.Tensor | None:
        """Collect one call site's tensor; the flattened union once every site of the pass is in, else None.
        Any ``shared_sites`` consecutive calls hold each site once, so a pass cut short only shifts which
        passes are observed together."""
        self._round.append(x.detach().float().reshape(-1).clone())
        if len(self._round) < self.shared_sites:
            return None
        return self._take_round()

    def _take_round(self) -> torch.Tensor:
        union, self._round = torch.cat(self._round), []
        return union

    def _adopt_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def init_from_weight(self, w: torch.Tensor) -> None:
        """Set qparams from a weight tensor directly (weights need no calibration data)."""
        self.observe(self.export_transform(w.detach()))

    def broadcast(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A per-tensor or per-channel parameter (scale, zero point) shaped to broadcast against ``x``."""
        if self.ch_axis < 0:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[self.ch_axis] = -1
        return t.reshape(shape)

    def export_transform(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic transform applied before quantization (identity except for DoReFa)."""
        return x

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Deployed (scale, integer zero_point), 1-D, detached."""
        raise NotImplementedError

    def calibration_problem(self) -> str:
        """Why this quantizer has no scale, in words for an error message."""
        if self.nonfinite_batches:
            return (f"every calibration batch it saw was non-finite (NaN/inf): {self.nonfinite_batches} batch(es) "
                    "ignored. Find where NaN/inf come from (a diverged layer, corrupt input data, an fp16 "
                    "overflow) and calibrate again")
        return ("it was never calibrated. Run calibration first (model.eval(); utils.state.enable_calibration(model); "
                "forward a few batches, or utils.calibrate.calibrate(model, batches)), then "
                "utils.state.enable_quantization(model)")

    def check_initialized(self, name: str = "") -> None:
        if not self.initialized:
            where = f" '{name}'" if name else ""
            raise RuntimeError(f"fake quantizer{where} has no scale yet: {self.calibration_problem()}.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():  # ids, masks, indices: never quantized
            self.non_float = True
            if self.observer_enabled and self.shared_sites > 1:  # still a site of the pass: keep the count
                union = self._join_round(x.new_empty(0, dtype=torch.float32))
                if union is not None:
                    self._observe_now(union)
            return x
        if self.observer_enabled:
            self.observe(x.detach())
        if not self.fake_quant_enabled:
            return x
        if not self.initialized:
            if self.is_weight:  # the data is the weight itself: no calibration batch needed
                self.observe(x.detach())
            elif self._round:  # a shared quantizer's first pass with fake quantization on: use what it has seen
                self._observe_now(self._take_round())
            self.check_initialized(self.qualname)
        if x.dtype != torch.float32:  # AMP: torch's fake-quant kernels want float32 inputs
            return self.fake_quant(x.float()).to(x.dtype)
        return self.fake_quant(x)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        s = self.scheme
        return (f"bit={s.bit}, range=[{self.quant_min}, {self.quant_max}], symmetry={s.symmetry}, "
                f"per_channel={s.per_channel}, observer={self.observer_enabled}, "
                f"fake_quant={self.fake_quant_enabled}")
