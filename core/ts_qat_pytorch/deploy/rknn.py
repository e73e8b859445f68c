"""Rockchip's NPU converter, rknn-toolkit2, as an onnxruntime-like session over an exported QDQ file.

rknn-toolkit2 pins numpy <= 1.26.4, onnx <= 1.18, protobuf <= 4.25.4 and torch <= 2.4, so it cannot live in this
project's environment. :class:`RknnSession` starts ``rknn_worker.py`` under the Python of an environment that has
it (``python=``, else ``$TS_QAT_RKNN_PYTHON``; ``nox -s deploy_check`` makes one) and talks to it over pipes. The
worker imports the file as a pre-quantized model (``build(do_quantization=False)``: the file's scales and zero
points, not a new calibration) and runs the NPU simulator; ``run`` has onnxruntime's signature, so a suite's
``evaluate_onnx`` takes either session.
"""
from __future__ import annotations

import io
import json
import os
import select
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx

ENV_VAR = "TS_QAT_RKNN_PYTHON"
_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rknn_worker.py")


class DeployError(RuntimeError):
    """The target cannot import or run the file; the message says where it stopped and what to do."""


@dataclass(frozen=True)
class TensorInfo:
    """What onnxruntime's ``get_inputs()`` / ``get_outputs()`` entries offer that the suites use."""
    name: str
    shape: list
    type: str


def _infos(values) -> list[TensorInfo]:
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        out.append(TensorInfo(v.name, shape, f"tensor({onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name})"))
    return out


def find_python(python: str | None = None) -> str:
    """The interpreter with rknn-toolkit2: ``python``, else $TS_QAT_RKNN_PYTHON; a DeployError says how to get one."""
    python = python or os.environ.get(ENV_VAR)
    if not python:
        raise DeployError(f"rknn-toolkit2 needs its own environment (it pins numpy <= 1.26.4, onnx <= 1.18 and torch <= "
                          f"2.4): run `python3 -m nox -s deploy_check -- ...`, which creates one, or set {ENV_VAR} to "
                          "the python of an environment with rknn-toolkit2 installed")
    if not os.path.exists(python):
        raise DeployError(f"{ENV_VAR} / python= names {python!r}, which does not exist; `python3 -m nox -s "
                          "deploy_check` creates .nox/rknn-env")
    return python


def _tail(path: str, lines: int = 6) -> str:
    try:
        with open(path, errors="replace") as f:
            last = [ln.rstrip() for ln in f.read().splitlines() if ln.strip()][-lines:]
    except OSError:
        return ""
    return ("; it ends:\n    " + "\n    ".join(last)) if last else ""


class RknnSession:
    """``RknnSession(path, platform="rk3588")``: the file built for ``platform`` and run in the simulator.

    ``build_s`` is the import + build + simulator start time, ``log_path`` rknn-toolkit2's log. Close it (or use
    it as a context manager) to stop the worker."""

    def __init__(self, path: str, platform: str = "rk3588", optimization_level: int = 3, python: str | None = None,
                 log_path: str | None = None, build_timeout_s: float = 600.0):
        python = find_python(python)
        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and OSError alike
            raise DeployError(f"{path} is not a readable ONNX file ({type(exc).__name__}: {exc})") from exc
        init_names = {i.name for i in model.graph.initializer}
        self._inputs = _infos([i for i in model.graph.input if i.name not in init_names])
        self._outputs = _infos(model.graph.output)
        self.path, self.platform = path, platform
        self.log_path = log_path or os.path.splitext(path)[0] + f"_{platform}.log"
        self._log = open(self.log_path, "wb")
        self._proc = subprocess.Popen([python, _WORKER, os.path.abspath(path), platform, str(optimization_level)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        ready, _, _ = select.select([self._proc.stdout], [], [], build_timeout_s)
        if not ready:  # seen: rknn-toolkit2's graph fusion running for hours on GELU blocks
            self._proc.kill()
            self._proc.wait()
            self._log.close()
            raise DeployError(f"rknn-toolkit2 did not finish importing and building {path} for {platform} in "
                              f"{build_timeout_s:.0f} s (build_timeout_s); its log: {self.log_path}{_tail(self.log_path)}")
        status = self._receive()
        info = json.loads(status.decode()) if status else {"ok": False, "stage": "start", "error": "no answer"}
        if not info.get("ok"):
            self.close()
            raise DeployError(f"rknn-toolkit2 could not {info.get('stage')} {path} for {platform}: "
                              f"{info.get('error')} (its log: {self.log_path}){_tail(self.log_path)}")
        self.build_s = float(info.get("build_s", 0.0))
        self.toolkit_version = info.get("version")

    def get_inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    def get_outputs(self) -> list[TensorInfo]:
        return list(self._outputs)

    def run(self, output_names, feeds: dict) -> list[np.ndarray]:
        missing = [i.name for i in self._inputs if i.name not in feeds]
        if missing:
            raise ValueError(f"feeds lack the inputs {missing} (the file's inputs: {[i.name for i in self._inputs]})")
        buf = io.BytesIO()
        np.savez(buf, **{str(k): np.ascontiguousarray(feeds[i.name]) for k, i in enumerate(self._inputs)})
        self._send(buf.getvalue())
        msg = self._receive()
        if msg is None:
            raise DeployError(f"the rknn-toolkit2 simulator stopped during inference (its log: {self.log_path})"
                              f"{_tail(self.log_path, 2)}")
        with np.load(io.BytesIO(msg)) as z:
            outs = [z[str(k)] for k in range(len(z.files))]
        if len(outs) != len(self._outputs):
            raise DeployError(f"the simulator returned {len(outs)} outputs, the file has {len(self._outputs)}")
        outs = [o.reshape(i.shape) if all(isinstance(d, int) for d in i.shape) and o.size == int(np.prod(i.shape))
                else o for o, i in zip(outs, self._outputs)]
        if output_names is None:
            return outs
        by_name = {i.name: o for i, o in zip(self._outputs, outs)}
        return [by_name[n] for n in output_names]

    def _send(self, payload: bytes) -> None:
        try:
            self._proc.stdin.write(struct.pack("<Q", len(payload)) + payload)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise DeployError(f"the rknn-toolkit2 worker is gone (its log: {self.log_path})") from exc

    def _receive(self) -> bytes | None:
        head = self._proc.stdout.read(8)
        if len(head) < 8:
            return None
        return self._proc.stdout.read(struct.unpack("<Q", head)[0])

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
