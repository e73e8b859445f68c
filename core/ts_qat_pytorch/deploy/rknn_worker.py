"""The RKNN side of :class:`ts_qat_pytorch.deploy.rknn.RknnSession`, run by the Python of an environment that has
rknn-toolkit2 (its pins: numpy <= 1.26.4, onnx <= 1.18, protobuf <= 4.25.4, torch <= 2.4 conflict with this
project's). It imports nothing from this package.

    python rknn_worker.py FILE.onnx TARGET_PLATFORM OPTIMIZATION_LEVEL

It loads the file as a pre-quantized (QDQ) model, builds it without re-quantizing, starts the x86 simulator of
the NPU and answers requests on stdin/stdout: each message is an 8-byte little-endian length and an ``.npz``
(request: arrays ``0..n-1``, the inputs in the file's order; answer: arrays ``0..m-1``, the outputs). The first
answer is a JSON status line's bytes. rknn-toolkit2's own log goes to stderr.

rknn-toolkit2 imports torch at start-up but its ONNX path never calls it: where torch is not installed, an
import stand-in is put in its place.
"""
import importlib.abc
import importlib.machinery
import io
import json
import os
import struct
import sys
import time
import types


def _torch_stand_in() -> None:
    """Any ``import torch...`` gives a module whose attributes are inert classes (callable, subclassable)."""

    class _Inert(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Inert(name, (), {})

        def __call__(cls, *args, **kwargs):
            return cls

        def __bool__(cls):
            return False

        def __iter__(cls):
            return iter(())

    class _Module(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Inert(name, (), {})

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname == "torch" or fullname.startswith("torch."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            m = _Module(spec.name)
            m.__path__ = []
            m.__version__ = "2.4.0"
            return m

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _Finder())


def _send(out, payload: bytes) -> None:
    out.write(struct.pack("<Q", len(payload)))
    out.write(payload)
    out.flush()


def _receive(inp):
    head = inp.read(8)
    if len(head) < 8:
        return None
    n = struct.unpack("<Q", head)[0]
    return inp.read(n)


def main() -> int:
    path, platform, level = sys.argv[1], sys.argv[2], int(sys.argv[3])
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # our rknn.py is not rknn-toolkit2's
    # the protocol owns the real stdout; everything printed (rknn-toolkit2's C and Python logs) goes to stderr
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer
    try:
        import torch  # noqa: F401
    except ImportError:
        _torch_stand_in()
    import numpy as np
    from rknn.api import RKNN

    t0 = time.time()
    rknn = RKNN(verbose=False)
    status = {"ok": False, "stage": "config"}
    try:
        if rknn.config(target_platform=platform, optimization_level=level) != 0:
            raise RuntimeError("config failed")
        status["stage"] = "load_onnx"
        if rknn.load_onnx(model=path) != 0:
            raise RuntimeError("load_onnx failed")
        status["stage"] = "build"
        if rknn.build(do_quantization=False) != 0:
            raise RuntimeError("build failed")
        status["stage"] = "init_runtime"
        if rknn.init_runtime() != 0:
            raise RuntimeError("init_runtime failed")
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
        status["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        _send(out, json.dumps(status).encode())
        return 1
    import rknn as rknn_pkg
    status.update(ok=True, stage="ready", build_s=round(time.time() - t0, 2),
                  version=getattr(rknn_pkg, "__version__", None))
    _send(out, json.dumps(status).encode())
    while True:
        msg = _receive(inp)
        if msg is None:
            break
        with np.load(io.BytesIO(msg)) as z:
            inputs = [z[str(i)] for i in range(len(z.files))]
        outputs = rknn.inference(inputs=inputs, data_format="nchw")
        buf = io.BytesIO()
        np.savez(buf, **{str(i): np.asarray(o) for i, o in enumerate(outputs or [])})
        _send(out, buf.getvalue())
    rknn.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
