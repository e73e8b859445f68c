"""ReconstructionConfig: the settings of :func:`ptq_reconstruction`, as data.

The keys are the ancestor's (MQBench's ``ptq_reconstruction`` config) where they mean the same thing, so an
existing YAML / EasyDict config works unchanged; ``block_depth`` is this toolkit's own.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields
from typing import Any, Mapping

__all__ = ["ReconstructionConfig", "ROUND_MODES", "PATTERNS"]

ROUND_MODES = ("learned_hard_sigmoid", "nearest")
PATTERNS = ("layer", "block")


@dataclass(frozen=True)
class ReconstructionConfig:
    """How the quantized model is fitted to the float one, unit by unit (a layer or a block).

    pattern:     "layer" (AdaRound: each quantized layer alone) or "block" (BRECQ: a residual block, a transformer
                 layer); see ``advanced_ptq.segments`` for how blocks are found.
    scale_lr:    Adam learning rate of the learned (LSQ) activation scales inside the unit; 0 keeps them fixed.
    warm_up:     fraction of ``max_count`` iterations without the rounding regulariser.
    weight:      weight of the rounding regulariser sum(1 - |2h - 1|^beta) in the loss.
    max_count:   iterations per unit (each one batch of the cached calibration data).
    b_range:     (start, end) of beta, annealed linearly after the warm-up (large beta: the regulariser leaves the
                 rounding free; small beta: it pushes every h to 0 or 1).
    keep_gpu:    keep the cached unit inputs and outputs on the model's device (else on the CPU, moved per step).
    round_mode:  "learned_hard_sigmoid" (AdaRound's rectified sigmoid, hardened to 0/1 at the end) or "nearest"
                 (weights keep round-to-nearest; only the activation scales are fitted, if scale_lr > 0).
    prob:        QDrop: the probability that an activation element keeps its quantized value during reconstruction
                 (as in the ancestor); 1 - prob is the drop probability. 1.0: no drop (AdaRound / BRECQ); 0.5: the
                 QDrop paper's setting. Applies to the unit's inputs (quantized vs float input) and to the
                 activation quantizers inside the unit; evaluation never drops.
    block_depth: "block" pattern only: a block is the layers sharing the first ``block_depth`` components of their
                 qualified name; None (default): the prefix up to the first numeric component ("layer1.0",
                 "features.3", "encoder.layer.5"), a layer without one ("conv1", "fc") being its own block.
    """

    pattern: str = "block"
    scale_lr: float = 4e-5
    warm_up: float = 0.2
    weight: float = 0.01
    max_count: int = 20000
    b_range: tuple[float, float] = (20.0, 2.0)
    keep_gpu: bool = True
    round_mode: str = "learned_hard_sigmoid"
    prob: float = 1.0
    block_depth: int | None = None

    def __post_init__(self):
        def bad(key, want):
            raise ValueError(f"reconstruction config '{key}' must be {want}, got {getattr(self, key)!r}")

        if self.pattern not in PATTERNS:
            bad("pattern", f"one of {PATTERNS}")
        if self.round_mode not in ROUND_MODES:
            bad("round_mode", f"one of {ROUND_MODES}")
        if not 0.0 <= self.warm_up < 1.0:
            bad("warm_up", "a fraction in [0, 1)")
        if not 0.0 < self.prob <= 1.0:
            bad("prob", "in (0, 1] (the probability of keeping an activation quantized; 1.0 = no drop)")
        if int(self.max_count) < 1:
            bad("max_count", "at least 1")
        if self.scale_lr < 0 or self.weight < 0:
            bad("scale_lr" if self.scale_lr < 0 else "weight", "non-negative")
        b = tuple(float(v) for v in self.b_range)
        if len(b) != 2 or min(b) <= 0:
            bad("b_range", "two positive numbers (start, end), e.g. [20, 2]")
        if self.block_depth is not None and int(self.block_depth) < 1:
            bad("block_depth", "None or a positive number of name components")
        object.__setattr__(self, "b_range", b)
        object.__setattr__(self, "max_count", int(self.max_count))

    @classmethod
    def from_any(cls, config: "ReconstructionConfig | Mapping[str, Any] | None") -> "ReconstructionConfig":
        """A config from this dataclass, another dataclass with the same field names, or a dict (an EasyDict, a
        YAML mapping); unknown keys are an error listing the valid ones."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if dataclasses.is_dataclass(config) and not isinstance(config, type):
            config = dataclasses.asdict(config)
        if not isinstance(config, Mapping):
            raise TypeError(f"reconstruction config must be a dict or a ReconstructionConfig, got "
                            f"{type(config).__name__}")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(config) - set(valid))
        if unknown:
            hints = {k: difflib.get_close_matches(str(k), valid, n=2) for k in unknown}
            hint = "; ".join(f"'{k}': did you mean {v}?" for k, v in hints.items() if v)
            raise ValueError(f"unknown reconstruction config keys {unknown}; valid keys: {valid}"
                             + (f" ({hint})" if hint else ""))
        return cls(**dict(config))
