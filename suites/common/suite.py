"""The suite contract: what a suite provides to the one runner (suites/common/runner.py).

A suite is its model, its data, its metric and its recipe. It subclasses :class:`Suite`, sets its plain data as
class attributes and overrides the methods that are its own; ``python -m suites <name>`` (or the suite's main.py)
runs it:

    class MySuite(Suite):
        name = "mysuite"                                 # outputs in <output-dir>/mysuite/, cache, metrics "suite"
        metric = Metric("top1", "higher")                # the headline number of the metrics JSON
        recipes = {"embedded": {...}, "general": {...}}  # flag defaults without / with --data
        def add_arguments(self, parser): ...             # the suite's own flags (--data is the runner's)
        def datasets(self, cfg) -> Data: ...             # train / calibration / validation sets, example input
        def build_model(self, cfg, arch, pretrained): ...  # the float architecture
        def evaluate(self, model, loader, run, prefix) -> dict: ...       # the metric on the PyTorch model
        def evaluate_onnx(self, session, loader, run, prefix) -> dict: ... # the same on an onnxruntime session

Twelve methods, each with a default that fits an image classifier whose batches are ``(images, target)``:
``add_arguments``, ``recipe``, ``check``, ``datasets``, ``build_model``, ``loss``, ``evaluate``, ``evaluate_onnx``,
``float_finetune``, ``make_training``, and two events: ``on_stage_end(run, stage, result)`` after each stage
(suites/common/stages/: ``float_eval``, ``calibration``, ``export``, ``ort_eval`` ...) and ``on_run_end(run)`` once,
before the metrics JSON is written. ``cfg`` is the run's frozen :class:`~suites.common.run.RunConfig` (every flag,
recipe applied), ``run`` the :class:`~suites.common.run.Run` (config, device, metrics, output paths).
Bad inputs are reported by raising :class:`SuiteError` with a message that names the problem and the fix; the
runner prints ``error: <message>`` and exits with 2.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class SuiteError(Exception):
    """A bad input (flag, file, data): the message names the problem and the fix."""


@dataclass(frozen=True)
class Metric:
    """The suite's headline metric: ``name`` is the key of the value in each evaluation result and of the metrics
    JSON's ``metric``; ``direction`` says which way is better ("higher" or "lower"); ``fmt`` formats it."""

    name: str
    direction: str = "higher"
    fmt: str = ".3f"

    def __post_init__(self):
        if self.direction not in ("higher", "lower"):
            raise ValueError(f"Metric direction must be 'higher' or 'lower', got {self.direction!r}")

    def format(self, value: float | None) -> str:
        return "-" if value is None else format(value, self.fmt)

    def better(self, value: float, than: float) -> bool:
        return value > than if self.direction == "higher" else value < than


@dataclass
class Data:
    """What the suite's data step gives the run: ``train`` (QAT and float fine-tune, augmented), ``calib``
    (calibration: training images without augmentation), ``val`` (every evaluation), ``name`` (recorded in the
    metrics JSON), ``example`` (the export's example input: a tensor or a tuple; batch ``--onnx-batch`` is baked in
    separately), ``facts`` (the metrics' ``extras``: classes, image size ...), ``checkpoint`` (entries stored in every
    QAT checkpoint) and ``cache_key`` (what the float fine-tune depends on besides the runner's float_* flags, batch
    size and seed: part of the cache file's hash)."""

    train: Any
    calib: Any
    val: Any
    name: str = ""
    example: Any = None
    facts: dict = field(default_factory=dict)
    checkpoint: dict = field(default_factory=dict)
    cache_key: dict = field(default_factory=dict)


@dataclass
class Evaluation:
    """An evaluation stage's result (``float_eval``, ``qat_eval``, ``ort_eval``): the scores recorded in the metrics
    and what the suite's evaluation returned under ``"detail"`` (kept out of the metrics: per-class values,
    detections), for its ``on_stage_end``."""

    scores: dict
    detail: Any = None


class Suite:
    """Defaults of the contract; a suite overrides what is its own (see the module docstring)."""

    name: str = ""
    metric: Metric = Metric("top1", "higher")
    #: decimals of the metrics JSON's differences (qat_minus_float, ort_minus_qat)
    digits: int = 3
    #: {"embedded": {...}, "general": {...}}: flag defaults of the two recipes (what :meth:`recipe` picks from)
    recipes: dict = {"embedded": {}, "general": {}}
    #: flag overrides of --smoke (a tiny run of every stage), applied to flags the user did not give
    smoke: dict = {}
    #: extra exception types (besides SuiteError) that are bad inputs: "error: ..." and exit 2
    errors: tuple[type[BaseException], ...] = ()
    #: train-time meters shown in the progress lines after Time / Data / Loss: (label, format), one per value of the
    #: scores :meth:`loss` returns
    train_meters: tuple[tuple[str, str], ...] = (("Acc@1", ":6.2f"), ("Acc@5", ":6.2f"))
    #: one log line's worth of an evaluation result (str.format of the scores; None: "<metric> <value>")
    summary: str | None = None
    #: the float stages keep the model and its batches in the channels_last layout (faster CPU convolutions)
    channels_last: bool = True
    #: the DataLoader's collate_fn (None: torch's default); a batch is (model input or tuple of inputs, target, ...)
    collate = None
    #: the float fine-tune's cache file is <cache-dir>/<arch>_<cache_tag>_float_<hash>.pth
    cache_tag: str = "embedded"
    #: the suite's script, relative to suites/<name>/ (the metrics' run.entry: tools rerun it)
    script: str = "main.py"
    #: extra prepare_custom_config_dict entries (leaf modules, exclusions), under the runner's bit widths
    prepare_custom: dict = {}
    #: extra keyword arguments of convert_export (input_names, output_names ...)
    export_options: dict = {}

    # ---- command line and recipe (before any work, in the launching process)
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the suite's own flags (model, data details). Flags whose default depends on the recipe default to
        None; :meth:`recipe` fills them."""

    def recipe(self, flags: argparse.Namespace) -> dict:
        """Defaults for every flag the user left at None: the embedded recipe without ``--data``, the general one
        with it. Keys are argparse dests (``lr``, ``batch_size``, ``epochs``, ``arch``, ...)."""
        return dict(self.recipes["embedded" if flags.data is None else "general"])

    def check(self, flags: argparse.Namespace) -> dict | None:
        """Range and cheap checks of the suite's flags once the recipe is applied (raise SuiteError), before long
        work; returns flags it resolves (``teacher``: "float" or "zoo"; ``finetune_float``, ``embedded_weights``,
        ``pretrained``, ...), laid over the runner's before the config is frozen."""
        return None

    # ---- data and model
    def datasets(self, cfg) -> Data:
        """The embedded default (``cfg.embedded``: no ``--data``) or the user's data."""
        raise NotImplementedError(f"suite {self.name!r} must implement datasets(cfg) -> Data(train, calib, val)")

    def build_model(self, cfg, arch: str, pretrained: bool) -> nn.Module:
        """The float model ``arch`` (the student's ``cfg.arch`` or a teacher's ``cfg.teacher_arch``), with the zoo's
        weights when ``pretrained``. The runner loads ``--model-path`` / ``--teacher-path`` weights into it."""
        raise NotImplementedError(f"suite {self.name!r} must implement build_model(cfg, arch, pretrained)")

    # ---- training
    def loss(self, output, target, teacher_output=None, cfg=None) -> tuple[torch.Tensor, tuple]:
        """(the training loss of one batch, one value per :attr:`train_meters` entry). With the teacher's output
        (``--distill-method kd``) the distillation loss; default: classifier logits, ``alpha * KL * T^2 + (1 - alpha)
        * CE`` (suites/common/training.py ``kd_loss``), else cross entropy; the meters top-1 / top-5."""
        from suites.common.meters import accuracy
        from suites.common.training import kd_loss
        if teacher_output is None:
            loss = F.cross_entropy(output.float(), target)
        else:
            loss = kd_loss(output.float(), teacher_output.float(), target, cfg.distill_alpha, cfg.temperature)
        with torch.no_grad():
            acc1, acc5 = accuracy(output.float(), target, topk=(1, 5))
        return loss, (float(acc1[0]), float(acc5[0]))

    def float_finetune(self, model: nn.Module, train_ds, run) -> None:
        """Train the float ``model`` (on ``run.device``) on ``train_ds``, rank 0, when ``cfg.finetune_float``; the
        runner caches the result (keyed by the recipe and ``Data.cache_key``). Default: AdamW one-cycle over
        --float-epochs x --float-images."""
        from suites.common.training import EpochSubsetSampler, Training, loader, train_epoch
        cfg = run.config
        sampler = EpochSubsetSampler(len(train_ds), cfg.float_images, cfg.seed + 7)
        dl = loader(train_ds, cfg.batch_size, cfg.workers, sampler=sampler, collate_fn=self.collate)
        steps = len(dl) * cfg.float_epochs
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.float_lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.float_lr, total_steps=max(2, steps),
                                                    pct_start=0.15)
        for ep in range(cfg.float_epochs):
            sampler.set_epoch(ep)
            train_epoch(run, dl, model, Training(opt, sched, prefix="Float"), ep)

    def make_training(self, model: nn.Module, steps_per_epoch: int, cfg):
        """(optimizer, per-step LR scheduler) of QAT and of float training with --data, or None (default) for the
        runner's (``--optim``, ``--lr``, ``--wd``, cosine to 0 over ``steps_per_epoch x --epochs``)."""
        return None

    # ---- the metric
    def evaluate(self, model: nn.Module, loader, run, prefix: str) -> dict:
        """The metric of the PyTorch model over ``loader``: a dict holding at least ``self.metric.name`` (and
        optionally ``"detail"``: see :class:`Evaluation`). ``prefix`` is the progress lines' label, nothing more."""
        raise NotImplementedError(f"suite {self.name!r} must implement evaluate(model, loader, run, prefix)")

    def evaluate_onnx(self, session, loader, run, prefix: str) -> dict:
        """The same metric of an onnxruntime session (the exported int8 model) over ``loader``."""
        raise NotImplementedError(f"suite {self.name!r} must implement evaluate_onnx(session, loader, run, prefix)")

    # ---- events
    def on_stage_end(self, run, stage: str, result) -> None:
        """After each stage (rank 0 for the stages only rank 0 runs): ``stage`` is the stage's name
        (suites/common/stages/), ``result`` what it produced (an :class:`Evaluation`, the calibrated model, the
        core's ExportResult ...). A suite adds its files and records (``run.metrics``) here."""

    def on_run_end(self, run) -> None:
        """Once, when the pipeline is done, before the metrics JSON is written and compared with --baselines."""
