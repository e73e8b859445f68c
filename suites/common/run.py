"""The run object: the flags and the recipe resolved once into a frozen :class:`RunConfig`, and a :class:`Run`
carrying what changes while the pipeline runs (devices and world size, the quantization plan, the teacher, output
paths, metrics). Every stage (suites/common/stages/) is a function of ``(run, suite)``."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from suites.common.metrics import RunMetrics
from suites.common.suite import Data, Evaluation, Suite


@dataclass(frozen=True)
class RunConfig:
    """Every flag of the run, the recipe applied and checked (suites/common/cli.py ``resolve``): ``cfg.lr``,
    ``cfg.arch``, ``cfg.out_dir`` ... Frozen: what a stage decides goes on the :class:`Run`."""

    flags: dict

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "flags":
            raise AttributeError(name)
        try:
            return self.flags[name]
        except KeyError:
            raise AttributeError(f"RunConfig has no flag {name!r}") from None

    def replace(self, **changes) -> RunConfig:
        return RunConfig({**self.flags, **changes})


def output_paths(out_dir: str, arch: str) -> dict[str, str]:
    """The manual's output files of a run (suites/common/checkpoints.py's docstring)."""
    names = dict(ckpt="checkpoint.pth", best="model_best.pth", float="checkpoint_float.pth", qparams="qparams.json",
                 onnx="onnx_quantization.onnx", bestonnx="bestonnx_quantization.onnx",
                 best_float="model_best_float.pth", results_csv="results.csv", results_png="results.png")
    return {k: os.path.join(out_dir, f"{arch}_{v}") for k, v in names.items()}


@dataclass
class Run:
    """One run of the pipeline in one process. ``backend`` and ``layer_config`` are the quantization plan (a
    mixed-precision search or a --resume checkpoint may change them); ``teacher`` the distillation teacher (where it
    comes from is ``config.teacher``: "path", "float", "zoo" or None)."""

    config: RunConfig
    suite: Suite
    device: torch.device
    metrics: RunMetrics
    world: int = 1
    rank: int = 0
    backend: str = "TSQAT"
    layer_config: dict | None = None
    teacher: Any = None
    data: Data | None = None
    val_loader: Any = None
    calib_loader: Any = None
    paths: dict = field(default_factory=dict)

    @property
    def distributed(self) -> bool:
        return self.config.distributed

    def stage_end(self, stage: str, result=None):
        """The suite's on_stage_end; returns ``result``."""
        self.suite.on_stage_end(self, stage, result)
        return result

    def evaluated(self, stage: str, scores: dict) -> Evaluation:
        """An evaluation's result: its ``detail`` taken out of the scores, the scores recorded as ``stage`` ("float",
        "qat", "ort") in the metrics, the suite told (``<stage>_eval``)."""
        scores = dict(scores)
        ev = Evaluation(scores, scores.pop("detail", None))
        self.metrics.score(stage, ev.scores)
        return self.stage_end(f"{stage}_eval", ev)

    def describe(self, scores: dict) -> str:
        """One log line of an evaluation result: the suite's ``summary`` format, else ``<metric> <value>``."""
        s = self.suite
        return s.summary.format(**scores) if s.summary else f"{s.metric.name} {s.metric.format(scores[s.metric.name])}"

