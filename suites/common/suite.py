"""The suite contract: what a suite provides to the one runner (suites/common/runner.py).

A suite is its model, its data, its metric and its recipe. It subclasses :class:`Suite`, overrides what is its
own and hands an instance to the runner:

    class MySuite(Suite):
        name = "mysuite"                                   # outputs in <output-dir>/mysuite/, cache, metrics "suite"
        metric = Metric("top1", "higher")                  # the headline number of the metrics JSON
        def add_arguments(self, parser): ...               # the suite's own flags (--data is the runner's)
        def recipe(self, args) -> dict: ...                # defaults of the runner's and the suite's flags
        def arch(self, args) -> str: ...                   # output file prefix ("mobilenet_v2")
        def datasets(self, args) -> Data: ...              # train / calibration / validation sets
        def build_model(self, args, arch, pretrained): ... # the float architecture
        def evaluate(self, model, loader, args, prefix) -> dict: ...       # the metric on the PyTorch model
        def evaluate_onnx(self, session, loader, args, prefix) -> dict: ... # the same on an onnxruntime session

    if __name__ == "__main__":
        sys.exit(runner.main(MySuite()))

Every method below has a default that fits an image classifier whose batches are ``(images, target)``.
Hooks whose default is the runner's own behaviour: ``finetunes_float(args)`` (whether the float model is fine-tuned
before QAT: the embedded default), ``float_finetune(model, train_ds, args)`` (the fine-tune itself: AdamW one-cycle)
and ``after_export(result, args, m)`` (extra files and measurements after each export: none);
``output_dir(args)`` (``<output-dir>/<name>/``), ``make_training(model, steps_per_epoch, args)`` (the QAT / float
training optimizer and schedule: None, the runner's) and ``after_calibration(q, args, m)`` (nothing).
Bad inputs are reported by raising :class:`SuiteError` with a message that names the problem and the fix; the
runner prints ``error: <message>`` and exits with 2, before long work where the suite checks early
(:meth:`Suite.check`).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
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
    """The suite's data sets: ``train`` (QAT and float fine-tune, augmented), ``calib`` (calibration: training
    images without augmentation) and ``val`` (every evaluation). ``name`` is recorded in the metrics JSON."""

    train: Any
    calib: Any
    val: Any
    name: str = ""


class Suite:
    """Defaults of the contract; a suite overrides what is its own (see the module docstring)."""

    name: str = ""
    metric: Metric = Metric("top1", "higher")
    #: decimals of the metrics JSON's differences (qat_minus_float, ort_minus_qat)
    digits: int = 3
    #: {"embedded": {...}, "general": {...}}: flag defaults of the two recipes (what :meth:`recipe` picks from)
    recipes: dict = {"embedded": {}, "general": {}}
    #: extra exception types (besides SuiteError) that are bad inputs: "error: ..." and exit 2
    errors: tuple[type[BaseException], ...] = ()
    #: train-time meters shown in the progress lines after Time / Data / Loss: (label, format)
    train_meters: tuple[tuple[str, str], ...] = (("Acc@1", ":6.2f"), ("Acc@5", ":6.2f"))
    #: the float stages keep the model and its batches in the channels_last layout (faster CPU convolutions)
    channels_last: bool = True
    #: the DataLoader's collate_fn (None: torch's default)
    collate = None
    #: the float fine-tune's cache file is <cache-dir>/<arch>_<cache_tag>_float_<hash>.pth
    cache_tag: str = "embedded"
    #: the suite's script, relative to suites/<name>/ (the metrics' run.entry: tools rerun it)
    script: str = "main.py"

    # ---- command line and recipe
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the suite's own flags (model, data details). Flags whose default depends on the recipe default to
        None; :meth:`recipe` fills them."""

    def recipe(self, args: argparse.Namespace) -> dict:
        """Defaults for every flag the user left at None: the embedded recipe without ``--data``, the general one
        with it. Keys are argparse dests (``lr``, ``batch_size``, ``epochs``, ...)."""
        return dict(self.recipes["embedded" if args.embedded else "general"])

    def smoke(self, args: argparse.Namespace) -> dict:
        """Overrides for ``--smoke`` (a tiny run of every stage), applied to flags the user did not give."""
        return {}

    def check_args(self, args: argparse.Namespace) -> None:
        """Range checks of the suite's flags once the recipe is applied (raise SuiteError); the runner checks its
        own flags (--lr, -j, --opset-version ...)."""

    def arch(self, args: argparse.Namespace) -> str:
        """The model's name: the prefix of every output file (``<arch>_checkpoint.pth``) and the metrics' ``arch``."""
        return getattr(args, "arch", None) or self.name

    # ---- cheap checks and data
    def check(self, args: argparse.Namespace) -> None:
        """Cheap checks before long work (architecture names, files): raise SuiteError."""

    def datasets(self, args: argparse.Namespace) -> Data:
        """The embedded default (``args.embedded``: no ``--data``) or the user's data."""
        raise NotImplementedError(f"suite {self.name!r} must implement datasets(args) -> Data(train, calib, val)")

    def extras(self, args: argparse.Namespace, data: Data) -> dict:
        """Suite facts recorded under the metrics JSON's ``extras`` (classes, image size, ...)."""
        return {}

    def cache_key(self, args: argparse.Namespace) -> dict:
        """What the embedded float fine-tune depends on besides the runner's float_* flags, batch size and seed
        (e.g. the image size): part of the cache file's hash."""
        return {}

    def checkpoint_extras(self, args: argparse.Namespace) -> dict:
        """Entries stored in every QAT checkpoint besides the runner's (epoch, best metric, arch, backend, RNG)."""
        return {}

    # ---- model and teacher
    def build_model(self, args: argparse.Namespace, arch: str, pretrained: bool) -> nn.Module:
        """The float model ``arch`` (the student's ``self.arch(args)`` or a teacher's), with the zoo's weights when
        ``pretrained``. The runner loads ``--model-path`` / ``--teacher-path`` weights into it."""
        raise NotImplementedError(f"suite {self.name!r} must implement build_model(args, arch, pretrained)")

    def embedded_weights(self, args: argparse.Namespace) -> bool:
        """Whether the embedded default starts from the zoo's pretrained weights (before its float fine-tune)."""
        return True

    def teacher_source(self, args: argparse.Namespace) -> str:
        """Where the distillation teacher comes from when no ``--teacher-path`` is given: "float" (a copy of the
        float model the student starts from, the default) or "zoo" (``build_model(args, teacher_arch,
        pretrained=True)``). Decided before long work: raise SuiteError for a teacher that cannot be used."""
        return "float"

    def teacher_arch(self, args: argparse.Namespace) -> str:
        return getattr(args, "teacher_arch", None) or self.arch(args)

    def prepare_config(self, model: nn.Module, args: argparse.Namespace) -> dict | None:
        """Extra ``prepare_custom_config_dict`` entries for this model (leaf modules, exclusions), merged into the
        runner's backend / bit-width configuration."""
        return None

    # ---- batches, loss, metric
    def inputs(self, batch, device: torch.device, memory_format=torch.contiguous_format):
        """(model inputs as a tuple, target) of one batch, on ``device``."""
        images, target = batch[0], batch[1]
        return ((images.to(device, non_blocking=True, memory_format=memory_format),),
                target.to(device, non_blocking=True))

    def loss(self, output, target) -> torch.Tensor:
        return F.cross_entropy(output.float(), target)

    def distill_loss(self, output, teacher_output, target, args: argparse.Namespace) -> torch.Tensor:
        """The ``--distill-method kd`` loss of one batch: the student's and the teacher's outputs (whatever
        structure the model returns) and the target. Default: classifier logits, ``alpha * KL * T^2 + (1 - alpha) *
        CE`` (suites/common/training.py ``kd_loss``)."""
        from suites.common.training import kd_loss
        return kd_loss(output.float(), teacher_output.float(), target, args.distill_alpha, args.temperature)

    def train_scores(self, output, target) -> tuple[float, ...]:
        """One value per :attr:`train_meters` entry for a training batch."""
        from suites.common.meters import accuracy
        acc1, acc5 = accuracy(output.float(), target, topk=(1, 5))
        return float(acc1[0]), float(acc5[0])

    def dummy_input(self, args: argparse.Namespace):
        """The export's example input (a tensor or a tuple, batch ``args.onnx_batch`` is baked in separately)."""
        raise NotImplementedError(f"suite {self.name!r} must implement dummy_input(args)")

    def describe(self, scores: dict) -> str:
        """One log line's worth of an evaluation result (``top-1 92.570 top-5 99.910``)."""
        return f"{self.metric.name} {self.metric.format(scores[self.metric.name])}"

    # ---- float fine-tune, after each export (defaults: the runner's own behaviour)
    def finetunes_float(self, args: argparse.Namespace) -> bool:
        """Whether the runner fine-tunes the float model (cached, :meth:`float_finetune`) before float eval and QAT.
        Default: the embedded default without ``--model-path``, with ``--float-epochs`` > 0. A suite whose user
        models need it too says so (transformers: a hub model with a new head); with ``--not-qat`` the fine-tune is
        then the float training."""
        return args.embedded and not args.model_path and args.float_epochs > 0

    def float_finetune(self, model: nn.Module, train_ds, args: argparse.Namespace) -> None:
        """Train the float ``model`` (on ``args.device``) on ``train_ds``, rank 0; the runner caches the result
        (keyed by the recipe and :meth:`cache_key`). Default: AdamW one-cycle over --float-epochs x --float-images
        (suites/common/stages.py ``finetune``)."""
        from suites.common.stages import finetune
        finetune(self, model, train_ds, args)

    def after_export(self, result, args: argparse.Namespace, m) -> None:
        """After each export (rank 0), with the core's ExportResult and the run's metrics: a suite's extra files
        and measurements (a float twin, latency, its own model format)."""

    def export_options(self, args: argparse.Namespace) -> dict:
        """Extra keyword arguments of ``convert_export`` (input_names, output_names ...)."""
        return {}

    def output_dir(self, args: argparse.Namespace) -> str:
        """Where the run's outputs go (``args.out_dir``): ``<output-dir>/<name>/``."""
        return os.path.join(args.output_dir, self.name)

    def make_training(self, model: nn.Module, steps_per_epoch: int, args: argparse.Namespace):
        """(optimizer, per-step LR scheduler) of QAT and of float training with --data, or None (default) for the
        runner's (``--optim``, ``--lr``, ``--wd``, cosine to 0 over ``steps_per_epoch x --epochs``)."""
        return None

    def after_calibration(self, q: nn.Module, args: argparse.Namespace, m) -> None:
        """Adjust the calibrated model ``q`` before QAT (e.g. narrow a quantizer's range); ``m`` (the run's
        RunMetrics, None in accuracy control's rebuilds) records what was done. Default: nothing."""

    def evaluate(self, model: nn.Module, loader, args: argparse.Namespace, prefix: str) -> dict:
        """The metric of the PyTorch model over ``loader``: a dict holding at least ``self.metric.name``."""
        raise NotImplementedError(f"suite {self.name!r} must implement evaluate(model, loader, args, prefix)")

    def evaluate_onnx(self, session, loader, args: argparse.Namespace, prefix: str) -> dict:
        """The same metric of an onnxruntime session (the exported int8 model) over ``loader``."""
        raise NotImplementedError(f"suite {self.name!r} must implement evaluate_onnx(session, loader, args, prefix)")
