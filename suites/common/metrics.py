"""The one metrics JSON every suite run writes (schema 1, documented in suites/README.md), and its reader.

    m = RunMetrics(path, suite="imagenet", arch="mobilenet_v2", backend="TSQAT", metric=Metric("top1"))
    with m.timed("qat_train"): ...                  # wall time per stage into times_s (a stage run twice adds up)
    m.score("float", {"top1": 92.57, "top5": 99.9})  # float / qat / ort: the headline value and every score
    m.record_export(export_result, onnx_batch=1)     # integer kernels, quantized layers, the files
    m.run["world_size"] = 2; m.extras["image_size"] = 64
    m.epoch_done({"epoch": 0, "train_loss": ...})    # the epoch's row (m.history: results CSV and PNG), then write()
    m.write()                                        # atomic, rank 0 only

    data = load_metrics(path)                        # what tools read: the schema checked, errors name the file

Top level, in this order: schema, suite, arch, backend, metric, direction, float, qat, ort, qat_minus_float,
ort_minus_qat, times_s, integer_kernels, integer_kernels_total, integer_matmul_kernels, quantized_layers, scores,
files, export, run, extras. ``run`` holds what the runner knows of the run (world size, steps, the script and its
command line: ``entry``, ``argv``), ``extras`` what the suite adds; nothing else is at the top level.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Callable

from suites.common.distributed import is_main, say
from suites.common.suite import Metric

SCHEMA = 1
KEYS = ("schema", "suite", "arch", "backend", "metric", "direction", "float", "qat", "ort", "qat_minus_float",
        "ort_minus_qat", "times_s", "integer_kernels", "integer_kernels_total", "integer_matmul_kernels",
        "quantized_layers", "scores", "files", "export", "deploy", "run", "extras")
STAGES = ("float", "qat", "ort")


class RunMetrics:
    def __init__(self, path: str, suite: str, arch: str, backend: str | None, metric: Metric,
                 log: Callable[[str], None] = say, digits: int = 3, entry: str | None = None, argv=None):
        self.path, self.log, self.t0, self.metric, self.digits = path, log, time.time(), metric, digits
        self.history = None  # the run's EpochHistory (suites/common/history.py), set by the runner
        self.data: dict = {k: None for k in KEYS}
        self.data.update(schema=SCHEMA, suite=suite, arch=arch, backend=backend, metric=metric.name,
                         direction=metric.direction, times_s={}, integer_kernels={}, scores={}, files={}, export={},
                         deploy={},
                         run={"entry": entry or _entry(suite), "argv": list(sys.argv[1:] if argv is None else argv)},
                         extras={})

    @property
    def run(self) -> dict:
        return self.data["run"]

    @property
    def extras(self) -> dict:
        return self.data["extras"]

    @property
    def files(self) -> dict:
        return self.data["files"]

    def __getitem__(self, key):
        return self.data[key]

    @contextlib.contextmanager
    def timed(self, name: str):
        t, ok = time.time(), False
        self.log(f"==> stage {name}")
        try:
            yield self
            ok = True
        finally:
            dt = time.time() - t
            self.data["times_s"][name] = round(dt + self.data["times_s"].get(name, 0.0), 2)
            if ok:
                self.log(f"==> stage {name} done in {dt:.1f} s")

    def score(self, stage: str, values: dict) -> None:
        """The evaluation of ``stage`` (float, qat or ort): its headline value (``metric.name``) and all values."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if self.metric.name not in values:
            raise KeyError(f"the {stage} evaluation returned {sorted(values)} but not the suite's metric "
                           f"{self.metric.name!r}: the suite's evaluate() must return it")
        self.data["scores"][stage] = dict(values)
        self.data[stage] = values[self.metric.name]
        d = self.data
        if d["qat"] is not None and d["float"] is not None:
            d["qat_minus_float"] = round(d["qat"] - d["float"], self.digits)
        if d["ort"] is not None and d["qat"] is not None:
            d["ort_minus_qat"] = round(d["ort"] - d["qat"], self.digits)

    def record_export(self, r, onnx_batch: int | None) -> None:
        """What ``convert_export`` reported (an ExportResult)."""
        self.data.update(quantized_layers=r.quantized_layers, integer_kernels=dict(r.integer_kernels),
                         integer_matmul_kernels=r.integer_matmul_kernels,
                         integer_kernels_total=sum(r.integer_kernels.values()))
        self.files.update(onnx=r.onnx_path, qparams=r.qparams_path)
        self.data["export"].update(exporter=r.exporter, opset_version=r.opset_version, onnx_batch=onnx_batch,
                                   input_names=list(r.input_names),
                                   max_abs_diff=max(r.max_abs_diff) if r.max_abs_diff else None,
                                   output_scale=list(getattr(r, "output_scale", []) or []))

    def record_deploy(self, target: str, values: dict, **facts) -> None:
        """A deployment target's evaluation of the exported file (``values`` as the suite's evaluate returns them),
        beside the QAT and onnxruntime figures: ``deploy[target]`` with the headline value and its gaps."""
        if self.metric.name not in values:
            raise KeyError(f"the {target} evaluation returned {sorted(values)} but not the suite's metric "
                           f"{self.metric.name!r}")
        v = values[self.metric.name]
        rec = {self.metric.name: v, "scores": dict(values), **facts}
        for ref in ("qat", "ort"):
            if self.data[ref] is not None:
                rec[f"minus_{ref}"] = round(v - self.data[ref], self.digits)
        self.data["deploy"][target] = rec

    def epoch_done(self, row: dict) -> None:
        """After an epoch (rank 0): its row in the history (results CSV and curves), and the metrics JSON rewritten,
        so that a run killed later leaves both."""
        if self.history is not None:
            self.history.add(row)
            self.files.update(results_csv=self.history.csv_path, results_png=self.history.png_path)
        self.write()

    def finish(self, baselines: str | None = None) -> int:
        """Write the file, log the summary and compare with ``baselines`` (a baselines.json): the exit code, 1 when
        a metric regressed. Every suite's last step."""
        self.write()
        if not is_main():
            return 0
        d, fmt = self.data, self.metric.format
        summary = ", ".join(f"{k} {fmt(d[k])}" for k in STAGES if d[k] is not None)
        kernels = f", integer kernels {d['integer_kernels_total']} ({d['integer_matmul_kernels']} conv/gemm/matmul)" \
            if d["integer_kernels_total"] is not None else ""
        summary += "".join(f", {t} {fmt(r[self.metric.name])}" for t, r in (d.get("deploy") or {}).items())
        self.log(f"=> metrics: {self.metric.name} {summary or '-'}{kernels}; times (s) {d['times_s']}")
        self.log(f"=> metrics written to {self.path}")
        if not baselines:
            return 0
        from suites.common.regression import compare_metrics, format_table
        rows, ok = compare_metrics(d, baselines)
        self.log(format_table(rows))
        self.log("regression: " + ("PASS" if ok else "FAIL"))
        return 0 if ok else 1

    def write(self) -> None:
        self.data["times_s"]["total"] = round(time.time() - self.t0, 2)
        if not is_main():
            return
        from ts_qat_pytorch.utils.utils import atomic_write_bytes
        self.files["metrics"] = os.path.abspath(self.path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        atomic_write_bytes(self.path, (json.dumps(self.data, indent=2, default=str) + "\n").encode())


def _entry(suite: str) -> str:
    """The script that runs the suite, relative to the repository: suites/<suite>/main.py by convention (tools
    rerun it with analysis flags: tools/analyze_suite.py)."""
    return f"suites/{suite}/main.py"


def validate(data) -> list[str]:
    """What makes ``data`` not a schema-1 metrics file (empty: it is one)."""
    if not isinstance(data, dict):
        return [f"expected a JSON object, got {type(data).__name__}"]
    problems = []
    if data.get("schema") != SCHEMA:
        problems.append(f"'schema' is {data.get('schema')!r}, expected {SCHEMA}")
    missing = [k for k in KEYS if k not in data]
    if missing:
        problems.append(f"missing keys {missing}")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        problems.append(f"unknown top-level keys {unknown} (suite facts belong under 'extras')")
    for k in ("times_s", "integer_kernels", "scores", "files", "export", "run", "extras"):
        if k in data and not isinstance(data[k], dict):
            problems.append(f"'{k}' must be an object")
    return problems


def load_metrics(path: str | os.PathLike) -> dict:
    """A metrics file of the schema, or ValueError naming the file, what is wrong and the fix."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"metrics file '{path}' does not exist: run the suite first") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"metrics file '{path}' is not JSON ({exc})") from None
    problems = validate(data)
    if problems:
        raise ValueError(f"metrics file '{path}' is not a suite metrics file of schema {SCHEMA} "
                         f"(suites/README.md): {'; '.join(problems)}; rerun the suite to write it again")
    return data
